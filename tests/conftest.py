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
    from drsft.toy.tinylm import build_model, build_tokenizer

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


def _import_stage(name: str):
    """``stages/<name>.py`` imported afresh as a module (its click command is ``.main``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_stage():
    return _import_stage


@pytest.fixture
def run_verify_stage():
    """Run the verify stage in-process on ``problems`` and ``samples`` written under ``work``
    (train.jsonl, sample/shard-00000.jsonl; the repo's params.yaml with verify.timeout_s 1 and
    workers 2). Returns click's result; the stage writes work/verdicts.jsonl and work/metrics.json."""
    import json

    import yaml
    from click.testing import CliRunner

    def run(work: Path, problems: list[dict], samples: list[dict]):
        (work / "sample").mkdir(exist_ok=True)
        (work / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
        (work / "sample" / "shard-00000.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples),
                                                           encoding="utf-8")
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        params["verify"].update(timeout_s=1, workers=2)
        (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        return CliRunner().invoke(_import_stage("verify").main, [
            "--params", str(work / "params.yaml"), "--problems", str(work / "train.jsonl"),
            "--samples", str(work / "sample"), "--out", str(work / "verdicts.jsonl"),
            "--metrics", str(work / "metrics.json")])

    return run
