"""Locating and loading the base model and its tokenizer.

``prepare`` writes ``models/base``: either a full HF model folder (the embedded toy model),
or ``reference.json`` naming a hub id or local path that is referenced, not copied (real scale).
Every later stage resolves the model through :func:`resolve_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REFERENCE_FILE = "reference.json"


def compute_device() -> str:
    """The kind of device models load on here: ``cuda`` or ``cpu``. With ``dtype: auto`` it decides
    the numerics (bf16 on a GPU, fp32 on CPU), so resumable shards record it in their fingerprint:
    a run resumed on the other kind of machine starts over instead of mixing the two."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(path: str | os.PathLike) -> str:
    """Return what ``from_pretrained`` should load for a model folder written by ``prepare``.

    Anything that is not an existing local folder (a hub id such as ``Qwen/Qwen2.5-Math-7B``)
    is returned unchanged.
    """
    path = Path(path)
    if not path.is_dir():
        return str(path)
    ref = path / REFERENCE_FILE
    if ref.exists():
        target = json.loads(ref.read_text(encoding="utf-8"))["model"]
        return str(target)
    if (path / "config.json").exists():
        return str(path)
    raise FileNotFoundError(f"{path}: neither a model folder (config.json) nor a {REFERENCE_FILE}")


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | os.PathLike, dtype: str = "auto", device: str | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM for inference or scoring (eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    model.to(device)
    model.eval()
    return model
