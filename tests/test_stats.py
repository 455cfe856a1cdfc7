"""The bootstrap behind every interval (drsft.stats): known-answer cases."""

import math

import numpy as np
import pytest

from drsft.evaluate import add_intervals, average_over, summarize
from drsft.stats import bootstrap, half_width, interval, point, problem_scores


def test_constant_scores_give_a_point_interval():
    reps = bootstrap({"a": {"b1": [0.25] * 40}}, n_boot=500)["a"]
    assert interval(reps["b1"]) == [0.25, 0.25] and interval(reps["average"]) == [0.25, 0.25]


def test_two_problems_known_distribution():
    """Scores 0 and 1: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    95 % percentile interval is [0, 1] and the replicate frequencies match."""
    reps = bootstrap({"a": {"b": [0.0, 1.0]}}, n_boot=20000, seed=3)["a"]["b"]
    freq = {v: float(np.mean(reps == v)) for v in (0.0, 0.5, 1.0)}
    assert abs(freq[0.0] - 0.25) < 0.015 and abs(freq[0.5] - 0.5) < 0.015 and abs(freq[1.0] - 0.25) < 0.015
    assert interval(reps) == [0.0, 1.0]


def test_large_sample_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    n, p = 10000, 0.3
    scores = (rng.random(n) < p).astype(float)
    reps = bootstrap({"a": {"b": scores}}, n_boot=4000)["a"]["b"]
    expected = 1.96 * math.sqrt(scores.mean() * (1 - scores.mean()) / n)
    assert half_width(interval(reps)) == pytest.approx(expected, rel=0.06)
    lo, hi = interval(reps)
    assert lo < scores.mean() < hi


def test_macro_average_resamples_within_each_benchmark():
    """The average of two benchmarks weighs each the same; its variance is (v1/n1 + v2/n2) / 4."""
    rng = np.random.default_rng(1)
    b1 = (rng.random(3000) < 0.5).astype(float)
    b2 = (rng.random(1000) < 0.1).astype(float)
    reps = bootstrap({"a": {"b1": b1, "b2": b2}}, n_boot=4000)["a"]
    sd = math.sqrt(b1.var() / b1.size + b2.var() / b2.size) / 2
    assert np.std(reps["average"]) == pytest.approx(sd, rel=0.08)
    assert point({"b1": b1, "b2": b2})["average"] == pytest.approx((b1.mean() + b2.mean()) / 2)


def test_paired_difference_removes_shared_problem_difficulty():
    """Arm B is arm A plus 0.1 on every problem: each arm's interval is wide, the difference exact."""
    rng = np.random.default_rng(2)
    a = rng.random(200) * 0.8
    reps = bootstrap({"A": {"b": a}, "B": {"b": a + 0.1}}, n_boot=1000)
    assert half_width(interval(reps["A"]["average"])) > 0.02
    lo, hi = interval(reps["B"]["average"] - reps["A"]["average"])
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_seed_noise_enters_the_interval():
    """Two training seeds, one scoring 0 everywhere and one 1: the seed resample alone gives means
    0, 1/2, 1 with probabilities 1/4, 1/2, 1/4 -- the interval is [0, 1] although problems agree."""
    reps = bootstrap({"a": {"b": [[0.0] * 50, [1.0] * 50]}}, n_boot=20000, seed=5)["a"]["average"]
    assert abs(float(np.mean(reps == 0.5)) - 0.5) < 0.015
    assert interval(reps) == [0.0, 1.0]
    assert point({"b": [[0.0] * 50, [1.0] * 50]})["average"] == 0.5


def test_paired_seeds_remove_the_world_to_world_variation_the_arms_share():
    """Two worlds, world 1 scoring 0.5 higher in both arms, arm B 0.1 above A in each: each arm's
    interval spans the worlds ([mean of world 0, mean of world 1]), the paired difference is exact;
    resampled per arm, the difference would range over +-0.5."""
    a = [[0.2] * 30, [0.7] * 30]
    b = [[0.3] * 30, [0.8] * 30]
    reps = bootstrap({"A": {"b": a}, "B": {"b": b}}, n_boot=4000, seed=7, paired_seeds=True)
    assert interval(reps["A"]["average"]) == pytest.approx([0.2, 0.7])
    lo, hi = interval(reps["B"]["average"] - reps["A"]["average"])
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    unpaired = bootstrap({"A": {"b": a}, "B": {"b": b}}, n_boot=4000, seed=7)
    lo, hi = interval(unpaired["B"]["average"] - unpaired["A"]["average"])
    assert lo == pytest.approx(-0.4) and hi == pytest.approx(0.6)
    with pytest.raises(ValueError, match="same number of seed rows"):
        bootstrap({"A": {"b": a}, "B": {"b": [0.1] * 30}}, paired_seeds=True)


def test_arms_must_share_problems_and_seed_counts():
    with pytest.raises(ValueError, match="same problems"):
        bootstrap({"A": {"b": [1.0, 0.0]}, "B": {"b": [1.0, 0.0, 1.0]}})
    with pytest.raises(ValueError, match="same problems"):
        bootstrap({"A": {"b": [1.0]}, "B": {"c": [1.0]}})
    with pytest.raises(ValueError, match="seeds"):
        bootstrap({"A": {"b": [[1.0], [0.0]], "c": [1.0]}})
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap({"A": {"b": []}})


def test_deterministic_from_seed():
    s = {"a": {"b": np.linspace(0, 1, 37)}}
    assert np.array_equal(bootstrap(s, seed=1)["a"]["b"], bootstrap(s, seed=1)["a"]["b"])
    assert not np.array_equal(bootstrap(s, seed=1)["a"]["b"], bootstrap(s, seed=2)["a"]["b"])


def test_evaluate_metrics_carry_intervals():
    """From prediction rows to metrics: a problem's k samples are one unit, the interval brackets avg@k."""
    preds = []
    for i in range(60):
        for j in range(4):
            preds.append({"problem_id": f"p{i}", "mode": "sample", "sample_index": j,
                          "correct": (i % 3 == 0) or (j == 0 and i % 3 == 1), "reason": "ok",
                          "finish_reason": "stop"})
    scores = problem_scores(preds)
    assert scores["p0"] == 1.0 and scores["p1"] == 0.25 and scores["p2"] == 0.0
    results = {"x": summarize(preds, 4), "y": summarize(preds, 4)}
    average = average_over(results)
    add_intervals(results, average, {"x": list(scores.values()), "y": list(scores.values())}, n_boot=500)
    for m in (*results.values(), average):
        lo, hi = m["avg_at_k_ci"]
        assert lo < m["avg_at_k"] < hi and 0 <= lo and hi <= 1
