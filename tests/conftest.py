import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT_CFG = {
    "system": "You are a careful math tutor.",
    "instruction": "Please reason step by step, and put your final answer within \\boxed{}.",
    "guided_template": "{problem}\nHint (a reference solution): {hint}\nNow solve it yourself. {instruction}",
}


@pytest.fixture(scope="session")
def prompt_cfg():
    return dict(PROMPT_CFG)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Llama + BPE tokenizer saved in HF format (seconds to build)."""
    from drsft.tinylm import build_model, build_tokenizer

    texts = [
        f"Compute ${a} + {b}$. We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        for a in range(12) for b in range(12)
    ] + [PROMPT_CFG["system"], PROMPT_CFG["instruction"]]
    tok = build_tokenizer(texts, vocab_size=320)
    model = build_model(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
