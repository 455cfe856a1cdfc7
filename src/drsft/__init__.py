"""drsft: data rewriting for off-policy supervised fine-tuning, as a DVC pipeline."""

import os

# OpenMP threads that spin while waiting make CPU torch 10-30x slower whenever another process
# shares the cores (measured here on 2 cores). Sleeping waiters cost nothing measurable when the
# machine is idle. Set before torch is imported; a value set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
