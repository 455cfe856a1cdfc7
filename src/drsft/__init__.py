"""drsft: data rewriting for off-policy supervised fine-tuning, as a DVC pipeline."""

import importlib.util
import os
import sys

# OpenMP threads that spin while waiting make CPU torch 10-30x slower whenever another process
# shares the cores (measured here on 2 cores). Sleeping waiters cost nothing measurable when the
# machine is idle. Set before torch is imported; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# What every stage needs. A stage run by another interpreter than the project's (e.g. `.venv/bin/dvc`
# without the venv activated runs `python` from the system) stops here with one line, not with a
# ModuleNotFoundError deep inside it; each stage script imports drsft before anything else.
_NEEDED = ("click", "yaml", "pydantic", "numpy", "torch", "transformers", "deepspeed", "dvclive", "math_verify",
           "tqdm")
_missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
if _missing:
    raise SystemExit(f"drsft: {', '.join(_missing)} not installed for {sys.executable}: run the pipeline in the "
                     "project's environment (`source .venv/bin/activate`, then dvc ...; or `make repro`)")
