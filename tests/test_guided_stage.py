"""The guided_align stage end to end on the tiny model, with a scripted generator in place of the
sampler (``make_backend``), so that the re-solves are known: which are correct, which were cut at
``max_new_tokens``, which copy the hint. Verification, the leak filter, selection, plain-prompt
scoring and the metrics are the stage's own."""

import json

import yaml
from click.testing import CliRunner

from conftest import ROOT
from drsft.io import read_jsonl
from drsft.rollout import Completion

PROBLEM = "Compute $3 + 4$. A train goes 3 miles and then 4 miles more on the same track."
HINT = ("Compute $3 + 4$. A train goes 3 miles and then 4 miles more on the same track. "
        "First we put the two legs together: 3 plus 4 gives 7 in all. The answer is \\boxed{7}.")
RESOLVES = {  # sample index -> (text, finish_reason, expected status)
    0: ("Compute $3 + 4$. A train goes 3 miles and then 4 miles more on the same track. "
        "So 3 + 4 = 7. \\boxed{7}", "stop", "kept"),                                   # restates the problem
    1: ("We add 3 + 4 = 7. \\boxed{7}", "length", "truncated"),                       # right box, cut off
    2: ("First we put the two legs together: 3 plus 4 gives 7 in all. \\boxed{7}", "stop", "leak_copy"),
    3: ("3 + 4 = 8. \\boxed{8}", "stop", "wrong"),
}


def _run(stage, work, model_dir):
    """The stage on work/{params.yaml,train.jsonl,unsolved.jsonl}; returns its output folder."""
    out = work / "guided"
    result = CliRunner().invoke(stage.main, [
        "--params", str(work / "params.yaml"), "--problems", str(work / "train.jsonl"),
        "--unsolved", str(work / "unsolved.jsonl"), "--model", str(model_dir), "--out", str(out),
        "--metrics", str(work / "guided.json"), "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


class ScriptedBackend:
    """Returns RESOLVES for every prompt (token ids from the real tokenizer)."""

    def __init__(self, tok):
        self.tok = tok
        self.prompts = []

    def generate(self, prompts, sp, progress=False):
        self.prompts.extend(prompts)
        out = []
        for _ in prompts:
            row = []
            for j in range(sp.n):
                text, finish, _ = RESOLVES[j]
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
                ids = ids + [self.tok.eos_token_id] if finish == "stop" else ids
                row.append(Completion(text, ids, [-0.5] * len(ids), finish))
            out.append(row)
        return out


def test_guided_align_keeps_finished_standalone_resolves_on_the_plain_prompt(tmp_path, tiny_model_dir, prompt_cfg,
                                                                               load_stage, monkeypatch):
    from drsft.models import load_tokenizer
    from drsft.prompts import render_prompt

    problems = [{"id": "p0", "problem": PROBLEM, "solution": HINT, "answer": "7", "source": "arith"},
                {"id": "p1", "problem": "Compute $1 + 1$.", "solution": "1 + 1 = 2. \\boxed{2}", "answer": "2",
                 "source": "arith"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "unsolved.jsonl").write_text(json.dumps({"problem_id": "p0"}) + "\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prompt"].update(prompt_cfg)
    params["guided_align"].update(n=4, keep_per_problem=4, max_shared_ngram=6, leak_phrases=["hint"], shard_size=1)
    params["verify"].update(workers=1)
    params["rollout"].update(backend="hf", dtype="auto")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    tok = load_tokenizer(tiny_model_dir)
    backend = ScriptedBackend(tok)
    stage = load_stage("guided_align")
    monkeypatch.setattr(stage, "make_backend", lambda *a, **k: backend)
    out = _run(stage, tmp_path, tiny_model_dir)

    guided_prompt = render_prompt(tok, PROBLEM, prompt_cfg, hint=HINT)
    plain_prompt = render_prompt(tok, PROBLEM, prompt_cfg)
    assert backend.prompts == [guided_prompt]             # generated under the hint ...
    resolves = read_jsonl(out / "resolves.jsonl")
    assert [r["status"] for r in resolves] == [RESOLVES[j][2] for j in range(4)]
    rows = read_jsonl(out / "selected.jsonl")
    assert [r["response"] for r in rows] == [RESOLVES[0][0]]   # only the finished, standalone, correct one
    row = rows[0]
    assert row["tier"] == "guided" and row["behaviour"] == "guided"
    assert row["prompt"] == plain_prompt and "Hint" not in row["prompt"]   # ... trained on the plain prompt
    assert row["behaviour_logprobs"] == resolves[0]["logprobs"]          # the sampler's, under the hint
    assert len(row["plain_logprobs"]) == len(row["response_ids"]) and row["plain_logprobs"] != row["behaviour_logprobs"]
    assert read_jsonl(out / "unsolved.jsonl") == []
    m = json.loads((tmp_path / "guided.json").read_text())
    assert m["status"] == {"kept": 1, "wrong": 1, "truncated": 1, "leak_phrase": 0, "leak_copy": 1}
    assert m["dropped"] == {"truncated": 1, "leak": 1, "leak_share": 0.5}
    assert m["solved"] == 1 and m["kept_rows"] == 1


def test_guided_align_n_0_skips_resolving_and_passes_every_problem_on(tmp_path, tiny_model_dir, prompt_cfg,
                                                                      load_stage, monkeypatch):
    """The tier ablation (DR without guided re-solving): no generation, every unsolved problem
    goes on to fallback, and the declared outputs exist."""
    problems = [{"id": f"p{i}", "problem": f"Compute ${i} + 1$.", "solution": f"\\boxed{{{i + 1}}}",
                 "answer": str(i + 1), "source": "arith"} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "unsolved.jsonl").write_text("".join(json.dumps({"problem_id": p}) + "\n" for p in ("p2", "p0")))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prompt"].update(prompt_cfg)
    params["guided_align"].update(n=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = load_stage("guided_align")
    monkeypatch.setattr(stage, "make_backend", lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated")))
    out = _run(stage, tmp_path, tiny_model_dir)
    assert read_jsonl(out / "resolves.jsonl") == [] and read_jsonl(out / "selected.jsonl") == []
    assert read_jsonl(out / "unsolved.jsonl") == [{"problem_id": "p2"}, {"problem_id": "p0"}]
    assert (out / "shards" / "manifest.json").exists()
    m = json.loads((tmp_path / "guided.json").read_text())
    assert m["attempted"] == 2 and m["solved"] == 0 and m["samples"] == 0 and m["dropped"]["leak"] == 0


def test_guided_shards_are_reused_only_for_the_same_generation_params(tmp_path, tiny_model_dir, prompt_cfg,
                                                                       load_stage, monkeypatch):
    """Every param that changes what is generated invalidates the shards; a filter param does not."""
    from drsft.models import load_tokenizer

    problems = [{"id": f"p{i}", "problem": f"Compute ${i} + 4$.", "solution": f"{i} + 4 = {i + 4}. \\boxed{{{i + 4}}}",
                 "answer": str(i + 4), "source": "arith"} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "unsolved.jsonl").write_text("".join(json.dumps({"problem_id": p["id"]}) + "\n" for p in problems))
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["prompt"].update(prompt_cfg)
    base["guided_align"].update(n=2, shard_size=1)
    base["verify"].update(workers=1)
    stage = load_stage("guided_align")
    monkeypatch.setattr(stage, "make_backend", lambda *a, **k: ScriptedBackend(load_tokenizer(tiny_model_dir)))

    def run(section, key, value):
        params = yaml.safe_load(yaml.safe_dump(base))
        params[section][key] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _run(stage, tmp_path, tiny_model_dir)
        return json.loads((tmp_path / "runs" / "guided.json").read_text())["resumed_shards"]

    assert run("guided_align", "seed", 0) == 0                        # the base params, first run
    for section, key, value, reused in [
            ("guided_align", "max_shared_ngram", 3, 3),                  # a filter param: generation reused
            ("rollout", "batch_size", 7, 3),                             # the engine layout: reused
            ("guided_align", "temperature", 0.7, 0), ("guided_align", "top_p", 0.9, 0),
            ("guided_align", "max_new_tokens", 64, 0), ("guided_align", "seed", 5, 0),
            ("guided_align", "n", 3, 0), ("rollout", "stop_token_ids", [3], 0),
            ("rollout", "dtype", "float32", 0), ("prompt", "instruction", "Solve it.", 0)]:
        run("guided_align", "seed", 0)                                   # back to the base params' shards
        assert run(section, key, value) == reused, (section, key)
