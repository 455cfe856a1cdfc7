"""The probe on a model that is not the embedded one (``prepare.probe.enabled: true``): the cheap report
before the expensive stages -- solve rate, guided solve rate and the self / guided / expert NLL
triple per problem source -- on the tiny stand-in model."""

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_probe_reports_the_gap_triple_for_a_local_model(tiny_model_dir, load_stage, tmp_path):
    problems = [{"id": f"{src}-{i}", "problem": f"Compute ${a} + {b}$.", "answer": str(a + b), "source": src,
                 "solution": f"We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}
                for i, (a, b, src) in enumerate([(1, 2, "gsm8k"), (3, 4, "gsm8k"), (5, 6, "math"), (7, 1, "math")])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["base"] = str(tiny_model_dir)           # a local model: not the toy world
    params["prepare"]["probe"].update(enabled=True, n_problems=4, n=2, max_new_tokens=24, batch_size=8,
                                      data_parallel_size=1, verify_workers=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(load_stage("probe").main, [
        "--params", str(tmp_path / "params.yaml"), "--problems", str(tmp_path / "train.jsonl"),
        "--model", str(tiny_model_dir), "--metrics", str(tmp_path / "probe.json")])
    assert result.exit_code == 0, result.output
    w = json.loads((tmp_path / "probe.json").read_text())["world"]
    assert w["probe_problems"] == 4 and set(w["families"]) == {"gsm8k", "math"}
    for fam in w["families"].values():
        assert fam["problems"] == 2 and fam["nll_expert"] > 0
        assert {"nll_own_correct", "nll_guided_correct", "nll_expert_guided_problems", "guided_correct_samples",
                "own_correct_samples"} <= set(fam)
    assert set(w["checks"]) >= {"solve_rate_in_range", "headroom", "realistic_gap"}
    assert 0 <= w["solve_rate"] <= 1 and w["own_correct_samples"] == sum(f["own_correct_samples"]
                                                                        for f in w["families"].values())
