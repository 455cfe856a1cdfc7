"""The ablation's statistics (drsft.ablation): arms x seeds x problems -> metrics/ablation.json."""

import numpy as np
import pytest

from drsft.ablation import ARMS, NOGUIDED_ARMS, PAIRS, format_tables, summarize, t_quantile, world_interval
from drsft.experiments import _walk, exp_name, experiment_groups, pretrain_seeds


def _scores(rng, p_by_bench, seeds):
    return {b: [(rng.random(n) < p).astype(float).tolist() for _ in range(seeds)] for b, (n, p) in p_by_bench.items()}


def test_summary_fields_and_paired_differences():
    rng = np.random.default_rng(0)
    benches = {"toy_a": (300, 0.3), "toy_b": (300, 0.6)}
    scores = {"base": {b: v[0] for b, v in _scores(rng, benches, 1).items()}}
    for arm, shift in (("sft", -0.2), ("dft", 0.0), ("dr-sft", 0.0), ("dr-dft", 0.15)):
        scores[arm] = _scores(rng, {b: (n, p + shift) for b, (n, p) in benches.items()}, 3)
    s = summarize(scores, n_boot=1000)
    assert set(s["arms"]) == {"base", "sft", "dft", "dr-sft", "dr-dft"}
    for name, a in s["arms"].items():
        lo, hi = a["avg_at_k_ci"]
        assert lo <= a["avg_at_k"] <= hi
        assert a["seeds"] == (1 if name == "base" else 3) and len(a["per_seed"]) == a["seeds"]
        assert np.mean(a["per_seed"]) == pytest.approx(a["avg_at_k"])
        assert set(a["benchmarks"]) == set(benches)
    assert set(s["comparisons"]) == {f"{x}_vs_{y}" for x, y in PAIRS}
    c = s["comparisons"]["dr-dft_vs_dft"]
    assert c["diff"] == pytest.approx(s["arms"]["dr-dft"]["avg_at_k"] - s["arms"]["dft"]["avg_at_k"])
    assert c["resolved"] and c["diff_ci"][0] > 0.05           # a 15-point gain is resolved
    assert s["comparisons"]["dft_vs_sft"]["resolved"]
    same = s["comparisons"]["dr-sft_vs_sft"]
    assert same["diff"] > 0


def test_no_difference_is_called_unresolved():
    rng = np.random.default_rng(1)
    benches = {"toy_a": (200, 0.4)}
    scores = {arm: _scores(rng, benches, 3) for arm in ("dft", "dr-dft")}
    s = summarize(scores, pairs=[("dr-dft", "dft")], n_boot=1000)
    c = s["comparisons"]["dr-dft_vs_dft"]
    assert c["diff_ci"][0] < 0 < c["diff_ci"][1] and not c["resolved"]
    table = format_tables(s, {"dft": ("expert", "dft"), "dr-dft": ("rewritten", "dft")})
    assert "inside the noise" in table and "| dr-dft | rewritten | dft | 3 |" in table and " ± " in table


def test_t_quantiles_and_the_interval_over_worlds():
    """Known values of Student's t (97.5 %: 12.706 at 1 df, 4.303 at 2, 2.571 at 5, 2.042 at 30);
    the interval over three worlds 1, 2, 3 (sd 1) is 2 ± 4.303 / sqrt(3)."""
    for df, q in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)
    assert t_quantile(0.95, 3) == pytest.approx(2.3534, abs=1e-3)
    lo, hi = world_interval([1.0, 2.0, 3.0])
    assert (hi - lo) / 2 == pytest.approx(4.3027 / np.sqrt(3), abs=1e-3) and (lo + hi) / 2 == pytest.approx(2.0)
    assert world_interval([0.5]) is None


def test_worlds_widen_intervals_the_bootstrap_cannot_reach():
    """Three worlds whose gains over the base model are +0.2, +0.02 and +0.04 (each world's own
    base model in row i of every arm): the bootstrap over 3 worlds cannot reach below the smallest
    and calls the gain resolved; the t interval over the per-world gains spans 0, so the
    comparison's interval (their union) does and it is not resolved. The table shows both."""
    rng = np.random.default_rng(3)
    n = 400
    base_p, gain = [0.2, 0.15, 0.3], [0.2, 0.02, 0.04]
    base = {"b": [(rng.random(n) < p).astype(float).tolist() for p in base_p]}
    arm = {"b": [(rng.random(n) < p + g).astype(float).tolist() for p, g in zip(base_p, gain)]}
    s = summarize({"base": base, "dr-dft": arm}, pairs=[("dr-dft", "base")], n_boot=2000, paired_seeds=True)
    c = s["comparisons"]["dr-dft_vs_base"]
    assert len(c["per_world"]) == 3 and c["per_world"][0] > 0.1
    assert c["diff_ci"][0] > 0                                  # the bootstrap alone: "resolved"
    assert c["world_ci"][0] < 0 < c["world_ci"][1]
    assert c["ci"] == [min(c["diff_ci"][0], c["world_ci"][0]), max(c["diff_ci"][1], c["world_ci"][1])]
    assert not c["resolved"]
    assert c["benchmarks"]["b"]["ci"][0] <= c["benchmarks"]["b"]["world_ci"][0]
    a = s["arms"]["dr-dft"]
    assert a["ci"][0] <= min(a["avg_at_k_ci"][0], a["world_ci"][0]) and a["seeds"] == 3
    assert a["benchmarks"]["b"]["ci"] == a["ci"]               # one benchmark: the average is it
    table = format_tables(s)
    assert "over worlds (t)" in table and "inside the noise" in table
    flat = summarize({"base": base, "dr-dft": arm}, pairs=[("dr-dft", "base")], n_boot=500)
    assert "world_ci" not in flat["comparisons"]["dr-dft_vs_base"]
    assert flat["comparisons"]["dr-dft_vs_base"]["ci"] == flat["comparisons"]["dr-dft_vs_base"]["diff_ci"]


def test_pairs_with_a_missing_arm_are_skipped():
    scores = {"base": {"b": [1.0, 0.0]}, "sft": {"b": [[1.0, 0.0]]}}
    assert summarize(scores, n_boot=200)["comparisons"] == {}


def test_experiment_listing_keeps_only_finished_experiments():
    """`dvc exp show --json` (DVC 3's shape) lists queued, running and failed experiments too; the
    ablation reads scores only from finished ones, so a killed run is rerun, never read."""
    def rev(name, rev, error=None):
        return {"rev": rev, "name": name, "data": {"params": {}}, "error": error}

    show = [{"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
            {**rev("main", "b0"), "experiments": [
                {"executor": {"state": "running"}, "name": "a-s0", "revs": [rev("a-s0", "r1")]},
                {"executor": {"state": "success"}, "name": "a-s1", "revs": [rev("a-s1", "r2")]},
                {"executor": None, "name": "a-s2", "revs": [rev("a-s2", "r3")]},
                {"executor": {"state": "failed"}, "name": "a-s3",
                 "revs": [rev("a-s3", "r4", {"msg": "Experiment run failed"})]},
                {"executor": {"state": "queued"}, "name": "a-s4", "revs": [rev("a-s4", "r5")]}]}]
    found = {}
    _walk(show, found)
    assert {k: v[0] for k, v in found.items()} == {"main": "b0", "a-s1": "r2", "a-s2": "r3"}


def test_experiment_groups_give_each_arm_its_data_loss_seed_and_upstream_overrides():
    [(shared, sets, shared_name)] = experiment_groups(ARMS + NOGUIDED_ARMS, [0, 1], "lr", ("train.lr=1e-4",))
    assert shared == ("train.lr=1e-4",) and shared_name == "shared-lr"
    assert len(sets) == 10
    assert sets["sft-lr-s1"] == ["train.data=expert", "train.loss=sft", "train.seed=1", "train.lr=1e-4"]
    assert sets["dr-noguided-dft-lr-s0"] == ["train.data=rewritten", "train.loss=dft", "train.seed=0",
                                             "guided_align.n=0", "train.lr=1e-4"]


# Every arm, written out here from its definition (the paper's four arms; drsft's extensions), not
# from drsft.ablation's tables: the data it trains on, its loss and what it sets upstream or in train.
ARM_DEFINITIONS = {
    "sft": ("expert", "sft", set()), "dft": ("expert", "dft", set()),
    "dr-sft": ("rewritten", "sft", set()), "dr-dft": ("rewritten", "dft", set()),
    "dr-is": ("rewritten", "is", set()), "dr-is-dft": ("rewritten", "is_dft", set()),
    "rft": ("self", "sft", set()),
    "dr-noguided-sft": ("rewritten", "sft", {"guided_align.n=0"}),
    "dr-noguided-dft": ("rewritten", "dft", {"guided_align.n=0"}),
    "dr-sft-keepall": ("rewritten", "sft", {"self_align.keep_per_problem=all"}),
    "dr-dft-keepall": ("rewritten", "dft", {"self_align.keep_per_problem=all"}),
    "dr-dft-lora": ("rewritten", "dft", {"train.lora.r=8"}),
    "dr-dft-mbnorm": ("rewritten", "dft", {"train.loss_norm=micro_batch_token_mean_sum"}),
    "dr-dft-question": ("rewritten", "dft", {"train.prompt_format=question"}),
    "dr-dft-paper": ("rewritten", "dft", {"train.loss_norm=micro_batch_token_mean_sum", "train.prompt_format=question",
                                          "train.response_end=eos", "train.weight_decay_1d=true",
                                          "train.drop_last=true", "train.lr_schedule=verl"}),
}


def test_every_arm_trains_on_its_defined_data_loss_and_overrides():
    from drsft.ablation import IS_ARMS, LORA_ARMS, PARITY_ARMS, TIER_ARMS

    arms = ARMS + IS_ARMS + NOGUIDED_ARMS + TIER_ARMS + LORA_ARMS + PARITY_ARMS
    assert {a for a, _, _ in arms} == set(ARM_DEFINITIONS)
    [(_, sets, _)] = experiment_groups(list({a[0]: a for a in arms}.values()), [3], "", ())
    for arm, (data, loss, extra) in ARM_DEFINITIONS.items():
        got = sets[exp_name(arm, "", 3)]
        assert got[:3] == [f"train.data={data}", f"train.loss={loss}", "train.seed=3"], arm
        assert set(got[3:]) == extra, arm


def test_world_groups_pretrain_a_model_per_seed_and_keep_the_workspace_world_for_the_first():
    """--worlds: one group per seed; the first seed keeps the workspace's pretrained model (no
    override, so its upstream stages stay cached), seed i pretrains with the pretraining seed + i
    (prepare.pretrain.seed, else prepare.seed), and every arm of a group carries it."""
    params = {"prepare": {"seed": 5, "pretrain": {"seed": None}}}
    assert pretrain_seeds(params, [0, 1, 2]) == {0: None, 1: 6, 2: 7}
    assert pretrain_seeds({"prepare": {"seed": 5, "pretrain": {"seed": 40}}}, [3, 4]) == {3: None, 4: 41}
    groups = experiment_groups(ARMS, [0, 1], "", (), pretrain_seeds(params, [0, 1]))
    assert [(g[0], g[2]) for g in groups] == [((), "shared-w0"), (("prepare.pretrain.seed=6",), "shared-w1")]
    assert set(groups[1][1]) == {exp_name(a, "", 1, True) for a, _, _ in ARMS} == {"sft-w1", "dft-w1", "dr-sft-w1",
                                                                                 "dr-dft-w1"}
    assert groups[1][1]["dr-dft-w1"] == ["train.data=rewritten", "train.loss=dft", "train.seed=1",
                                         "prepare.pretrain.seed=6"]
    assert groups[0][1]["sft-w0"] == ["train.data=expert", "train.loss=sft", "train.seed=0"]
    tagged = experiment_groups(ARMS[:1], [0, 1], "t", ("x.y=1",), {0: None, 1: 6})
    assert [(g[0], g[2]) for g in tagged] == [(("x.y=1",), "shared-t-w0"), (("x.y=1", "prepare.pretrain.seed=6"),
                                                                            "shared-t-w1")]


def test_worlds_need_the_toy_model(tmp_path, monkeypatch):
    """--worlds redraws the embedded model's pretraining: refused, before anything runs, for a hub model."""
    from pathlib import Path

    import yaml
    from click.testing import CliRunner

    from drsft.experiments import ablation_command

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["model"]["base"] = "Qwen/Qwen2.5-Math-7B"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(ablation_command, ["--worlds"])
    assert result.exit_code == 2 and "not toy" in result.output, result.output


def test_the_workspace_restore_touches_only_what_stages_write():
    """After a shared run the ablation restores from HEAD only params.yaml, dvc.lock and the git-
    tracked stage outputs (metrics/, dvclive/): a file the user edits meanwhile (code, docs, tests)
    is never reverted, nor the script's own summaries."""
    from drsft.experiments import _stage_written

    assert all(_stage_written(p) for p in ("params.yaml", "dvc.lock", "metrics/probe.json",
                                           "metrics/plots/tiers.csv", "dvclive/train/metrics.json"))
    assert not any(_stage_written(p) for p in ("Makefile", "README.md", "docs/results.md", "src/drsft/stats.py",
                                               "tests/test_ablation.py", "metrics/ablation.json",
                                               "metrics/ablation-w.json", "metrics/gap_sweep.json"))


def test_gap_sweep_knobs_tags_and_the_reused_ablation(tmp_path, monkeypatch):
    """Each knob tags its experiments apart; the workspace's ablation is reused only at the knob values
    it was made with (the style knob, absent from a file made before it existed, reads 0); the
    figure is drawn against the knob's values."""
    import json

    from drsft.ablation import ARMS
    from drsft.gap_sweep import KNOBS, _current_ablation, plot_png, tag_for

    assert tag_for(0.2, 0.2) == "" and tag_for(0.4, 0.2) == "tb0.4"
    assert tag_for(0.5, 0.0, KNOBS["expert_model_style_frac"].prefix) == "ms0.5"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    made = {"seeds": [0, 1, 2], "textbook_frac": 0.2, "vary_world": False, "overrides": [],
            "arms": {a: {} for a, _, _ in ARMS}}
    (tmp_path / "metrics/ablation.json").write_text(json.dumps(made))
    here = {"textbook_frac": 0.2, "expert_model_style_frac": 0.0}
    assert _current_ablation([0, 1, 2], here) is not None
    assert _current_ablation([0, 1, 2], {**here, "expert_model_style_frac": 0.5}) is None
    assert _current_ablation([0, 1, 2], {**here, "textbook_frac": 0.4}) is None
    assert _current_ablation([0, 1], here) is None
    (tmp_path / "metrics/ablation.json").write_text(json.dumps({**made, "vary_world": True}))
    assert _current_ablation([0, 1, 2], here) is None

    arms = ["base", "sft"]
    comp = {"diff": 0.1, "diff_ci": [0.05, 0.15]}
    comparisons = {v: {n: comp for n in ("dr-dft_vs_dft", "dr-sft_vs_sft", "dr-dft_vs_base")} for v in (0.0, 1.0)}
    for knob in KNOBS:
        rows = [{knob: v, "nll_ratio": r, **{k: 0.3 for a in arms for k in (a, f"{a}_low", f"{a}_high")}}
                for v, r in ((1.0, 1.4), (0.0, 16.5))]
        plot_png(rows, arms, comparisons, str(tmp_path / f"docs/{knob}.png"), knob)
        assert (tmp_path / f"docs/{knob}.png").stat().st_size > 10_000
