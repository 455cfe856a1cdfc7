"""params.yaml is validated once, at every stage start, against a typed schema (drsft.schema).

Every problem -- unknown key, wrong type, out-of-range value, missing key, inconsistent values --
is reported with its key path, one line per problem, before a stage does any work.
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drsft.params import ParamsError, load_params, main, read_params, section

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def _write(tmp_path: Path, data, name="params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _errors(tmp_path: Path, data) -> list[str]:
    path = _write(tmp_path, data)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    lines = str(info.value).splitlines()
    for line in lines:  # one problem per line, each naming the file; no pydantic noise
        assert line.startswith(f"{path}: "), line
        assert "errors.pydantic.dev" not in line and "validation error" not in line.lower(), line
    return lines


def _mutated(path: str, value=None, delete=False):
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


def _leaf_paths(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path
        if isinstance(value, dict):
            yield from _leaf_paths(value, path)


# ----------------------------------------------------------------------------------------------
# Valid files


@pytest.mark.parametrize("name", ["params.yaml"] + sorted(p.relative_to(ROOT).as_posix()
                                                          for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_params_files_validate(name):
    """params.yaml, and every configs/*.yaml laid over it, pass the schema unchanged."""
    from drsft.config import load_composed

    params = load_composed(ROOT / name, ROOT / "params.yaml")
    if name == "params.yaml":
        assert params == load_params(ROOT / name) == yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    assert section(params, "train") is params["train"]


def test_values_are_returned_as_written(tmp_path):
    data = _mutated("sample.temperature", 1)          # an int for a float key: accepted, not converted
    params = load_params(_write(tmp_path, data))
    assert params["sample"]["temperature"] == 1 and type(params["sample"]["temperature"]) is int
    assert params["train"]["is_clip"] == BASE["train"]["is_clip"] and isinstance(params["train"]["is_clip"], list)


def test_is_clip_without_cap_is_valid(tmp_path):
    load_params(_write(tmp_path, _mutated("train.is_clip", [0.5, None])))


# ----------------------------------------------------------------------------------------------
# Bad files: the key path and a message per problem

BAD = [
    # (id, mutation, key path, message fragment)
    ("unknown_top_level_key", lambda d: d.update(trainer={"lr": 1}), "trainer",
     "unknown key (did you mean 'train'? allowed: model, prompt, prepare"),
    ("unknown_nested_key", lambda d: d["train"].update(lrr=1e-3), "train.lrr", "unknown key (did you mean 'lr'?"),
    ("unknown_deep_key", lambda d: d["prepare"]["files"]["train"].update(answr="x"),
     "prepare.files.train.answr", "unknown key"),
    ("wrong_type_int", lambda d: d["sample"].update(n="yes"), "sample.n", "must be an integer (got 'yes')"),
    ("bool_for_int", lambda d: d["evaluate"].update(k=True), "evaluate.k", "must be an integer (got true)"),
    ("float_for_int", lambda d: d["sample"].update(shard_size=50.0), "sample.shard_size", "must be an integer"),
    ("string_for_bool", lambda d: d["evaluate"].update(greedy="yes"), "evaluate.greedy", "must be true or false"),
    ("yaml_string_number", lambda d: d["train"].update(lr="0.001"), "train.lr", "must be a number (got '0.001')"),
    ("nan", lambda d: d["train"].update(lr=float("nan")), "train.lr", "must be a finite number"),
    ("temperature_negative", lambda d: d["sample"].update(temperature=-1), "sample.temperature",
     "must be >= 0 (got -1)"),
    ("n_zero", lambda d: d["sample"].update(n=0), "sample.n", "must be >= 1 (got 0)"),
    ("guided_n_negative", lambda d: d["guided_align"].update(n=-1), "guided_align.n", "must be >= 0 (got -1)"),
    ("verify_mode", lambda d: d["verify"].update(mode="lenient"), "verify.mode", "must be one of 'boxed', 'paper'"),
    ("adam_betas", lambda d: d["train"].update(adam_betas=[0.9, 1.5]), "train.adam_betas", "each a number in [0, 1)"),
    ("unknown_loss", lambda d: d["train"].update(loss="foo"), "train.loss",
     "must be one of 'sft', 'dft', 'is', 'is_dft' (got 'foo')"),
    ("zero_stage_5", lambda d: d["train"].update(zero_stage=5), "train.zero_stage", "must be <= 3 (got 5)"),
    ("global_batch_not_multiple", lambda d: d["train"].update(micro_batch_size=8, global_batch_size=30),
     "train.global_batch_size", "must be a multiple of train.micro_batch_size (8) (got 30)"),
    ("is_clip_low_above_high", lambda d: d["train"].update(is_clip=[3.0, 1.0]), "train.is_clip", ">= low"),
    ("is_clip_not_pair", lambda d: d["train"].update(is_clip=[1.0]), "train.is_clip", "must be [low, high]"),
    ("top_p_zero", lambda d: d["sample"].update(top_p=0), "sample.top_p", "must be > 0 (got 0)"),
    ("top_p_above_one", lambda d: d["evaluate"].update(top_p=1.5), "evaluate.top_p", "must be <= 1 (got 1.5)"),
    ("bad_benchmark_element", lambda d: d["evaluate"].update(benchmarks=["toy_arith", 3]),
     "evaluate.benchmarks[1]", "must be a string (got 3)"),
    ("unprepared_benchmark", lambda d: d["evaluate"].update(benchmarks=["toy_arith", "toy_calculus"]),
     "evaluate.benchmarks[1]", "'toy_calculus' is not a benchmark prepare writes"),
    ("no_benchmarks", lambda d: d["evaluate"].update(benchmarks=[]), "evaluate.benchmarks", "at least 1 item"),
    ("duplicate_benchmark", lambda d: d["evaluate"].update(benchmarks=["toy_arith", "toy_arith"]),
     "evaluate.benchmarks", "duplicate benchmark 'toy_arith'"),
    ("unknown_family", lambda d: d["prepare"]["toy"].update(families=["arith", "calculus"]),
     "prepare.toy.families[1]", "must be one of 'arith', 'linear', 'fraction', 'decimal', 'precedence'"),
    ("unknown_backend", lambda d: d["rollout"].update(backend="sglang"), "rollout.backend", "must be one of 'hf', 'vllm'"),
    ("unknown_dtype", lambda d: d["rollout"].update(dtype="fp16"), "rollout.dtype", "(got 'fp16')"),
    ("unknown_rule", lambda d: d["self_align"].update(rule="longest"), "self_align.rule", "'highest_logprob'"),
    ("unknown_is_level", lambda d: d["train"].update(is_level="batch"), "train.is_level", "'token', 'sequence'"),
    ("unknown_train_data", lambda d: d["train"].update(data="mixed"), "train.data", "'rewritten', 'expert'"),
    ("unknown_loss_norm", lambda d: d["train"].update(loss_norm="sequence_mean"), "train.loss_norm",
     "'global_token_mean', 'micro_batch_token_mean_sum'"),
    ("question_prompt_with_is", lambda d: d["train"].update(loss="is_dft", prompt_format="question"),
     "train.prompt_format", "use train.prompt_format sampling with is / is_dft"),
    ("unknown_response_end", lambda d: d["train"].update(response_end="eot"), "train.response_end",
     "'end_of_turn', 'eos'"),
    ("drop_last_string", lambda d: d["train"].update(drop_last="yes"), "train.drop_last", "must be true or false"),
    ("keep_some", lambda d: d["self_align"].update(keep_per_problem="some"), "self_align.keep_per_problem",
     "must be a positive integer or 'all' (got 'some')"),
    ("keep_zero", lambda d: d["guided_align"].update(keep_per_problem=0), "guided_align.keep_per_problem",
     "must be a positive integer or 'all' (got 0)"),
    ("probe_enabled_int", lambda d: d["prepare"]["probe"].update(enabled=1), "prepare.probe.enabled",
     "must be one of 'auto', true, false (got 1)"),
    ("timeout_zero", lambda d: d["verify"].update(timeout_s=0), "verify.timeout_s", "must be > 0"),
    ("workers_negative", lambda d: d["verify"].update(workers=-1), "verify.workers", "must be >= 0"),
    ("lr_zero", lambda d: d["train"].update(lr=0), "train.lr", "must be > 0"),
    ("data_parallel_zero", lambda d: d["rollout"].update(data_parallel_size=0), "rollout.data_parallel_size",
     "must be >= 1"),
    ("launcher_empty", lambda d: d["train"].update(launcher=""), "train.launcher", "must not be empty"),
    ("subsample_zero", lambda d: d["prepare"]["files"]["train"].update(subsample=0),
     "prepare.files.train.subsample", "must be >= 1"),
    ("greedy_sampling_n", lambda d: d["sample"].update(temperature=0, n=4), "sample.n",
     "greedy decoding"),
    ("greedy_guided_n", lambda d: d["guided_align"].update(temperature=0, n=2), "guided_align.n",
     "greedy decoding"),
    ("greedy_probe_n", lambda d: d["prepare"]["probe"].update(temperature=0, n=4), "prepare.probe.n",
     "greedy decoding"),
    ("greedy_twice", lambda d: d["evaluate"].update(temperature=0, k=1, greedy=True), "evaluate.greedy",
     "would repeat it"),
    ("section_not_mapping", lambda d: d.update(verify=[1, 2]), "verify", "must be a mapping"),
    ("template_without_hint", lambda d: d["prompt"].update(guided_template="{problem} {instruction}"),
     "prompt.guided_template", "must contain {hint}"),
    ("template_unknown_field", lambda d: d["prompt"].update(guided_template="{problem} {hint} {answer}"),
     "prompt.guided_template", "not a valid format string"),
    ("files_benchmark_entry", lambda d: d["prepare"]["files"].update(benchmarks=[{"name": "a/b", "path": "x"}]),
     "prepare.files.benchmarks[0].name", "must be a benchmark name"),
    ("toy_model_needs_toy_source", lambda d: d["prepare"].update(source="files"), "model.base",
     "needs prepare.source: toy"),
    ("missing_required_key", lambda d: d["verify"].pop("workers"), "verify.workers", "missing required key"),
    ("missing_section", lambda d: d.pop("fallback"), "fallback", "missing required key"),
]


@pytest.mark.parametrize("mutate,path,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_value_is_reported_with_its_key_path(tmp_path, mutate, path, fragment):
    data = copy.deepcopy(BASE)
    mutate(data)
    lines = _errors(tmp_path, data)
    hits = [line for line in lines if line.startswith(f"{tmp_path / 'params.yaml'}: {path}: ")]
    assert hits, f"no problem reported at {path}: {lines}"
    assert any(fragment in line for line in hits), f"{fragment!r} not in {hits}"


def test_every_key_of_params_yaml_is_required(tmp_path):
    """No default lives in the schema: deleting any key of params.yaml is an error naming it."""
    from drsft.schema import check

    paths = list(_leaf_paths(BASE))
    assert len(paths) > 100
    for path in paths:
        found = check(_mutated(path, delete=True))
        assert (path, "missing required key (params.yaml has every key with its default)") in found, (path, found)


def test_every_problem_is_reported_one_per_line(tmp_path):
    data = copy.deepcopy(BASE)
    data["train"]["loss"] = "foo"
    data["train"]["zero_stage"] = 5
    data["sample"]["temperature"] = -1
    data["evaluate"]["bogus"] = 1
    lines = _errors(tmp_path, data)
    assert [re.match(r".*?: (\S+): ", line).group(1) for line in lines] == \
        ["sample.temperature", "train.loss", "train.zero_stage", "evaluate.bogus"]
    assert lines[1] == f"{tmp_path / 'params.yaml'}: train.loss: must be one of 'sft', 'dft', 'is', 'is_dft' (got 'foo')"


def test_duplicate_yaml_key_and_syntax_errors(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"line 3, column 3: duplicate key 'lr' \(first on line 2\)"):
        read_params(path)
    path.write_text("train: [1\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML: line"):
        load_params(path)
    path.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ParamsError, match=r"\(top level\): must be a mapping"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


# ----------------------------------------------------------------------------------------------
# The check CLI and a stage


def test_check_cli(tmp_path, capsys):
    good = _write(tmp_path, BASE, "good.yaml")
    bad = _write(tmp_path, _mutated("train.loss", "foo"), "bad.yaml")
    assert main(["check", str(good)]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    assert main(["check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"{bad}: train.loss: must be one of 'sft', 'dft', 'is', 'is_dft' (got 'foo')"
    proc = subprocess.run([sys.executable, "-m", "drsft.params", "check", str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 1 and "train.loss: must be one of" in proc.stderr


def test_stage_stops_before_any_work_with_one_line_per_problem(tmp_path):
    data = copy.deepcopy(BASE)
    data["verify"]["workers"] = "two"
    data["train"]["zero_stage"] = 5
    data["sample"]["nn"] = 4
    params = _write(tmp_path, data)
    out, metrics = tmp_path / "verify" / "verdicts.jsonl", tmp_path / "metrics" / "verify.json"
    cmd = [sys.executable, "stages/verify.py", "--params", str(params), "--problems", str(tmp_path / "absent.jsonl"),
           "--samples", str(tmp_path / "absent"), "--out", str(out), "--metrics", str(metrics)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line.removeprefix("Error: ") for line in proc.stderr.strip().splitlines()]
    assert lines == [(f"{params}: sample.nn: unknown key (did you mean 'n'? allowed: temperature, top_p, "
                      "max_new_tokens, seed, n, shard_size)"),
                     f"{params}: verify.workers: must be an integer (got 'two')",
                     f"{params}: train.zero_stage: must be <= 3 (got 5)"], proc.stderr
    assert not out.parent.exists() and not metrics.parent.exists()   # nothing read, nothing written


def test_exponent_floats_read_as_yaml_1_2_like_dvc(tmp_path):
    """`dvc exp run -S train.lr=3e-5` writes `lr: 3e-05`: a float for DVC (YAML 1.2), a string for
    plain PyYAML (1.1). The stages read it as DVC does."""
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^(  lr:) [^#\n]*", r"\1 3e-05  ", text, count=1)
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["train"]["lr"] == "3e-05"          # what PyYAML alone would give
    assert load_params(path)["train"]["lr"] == 3e-05
    for raw, value in [("1e-4", 1e-4), ("-2.5E+3", -2500.0), ("-.5", -0.5), ("5", 5), ("1.2.3", "1.2.3"),
                       ("e5", "e5"), ("'1e-4'", "1e-4")]:
        one = tmp_path / "one.yaml"
        one.write_text(f"a: {raw}\n", encoding="utf-8")
        assert read_params(one)["a"] == value, raw
