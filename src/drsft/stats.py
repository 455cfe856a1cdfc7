"""Confidence intervals for avg@k accuracy: a bootstrap over problems, and over training seeds.

Every interval in drsft comes from one resampling scheme, :func:`bootstrap`:

* **Problems** are resampled with replacement *within each benchmark* (stratified), and a
  problem's k samples move together: the unit is the problem's score, the mean of its k verdicts.
  The statistic is the macro average over benchmarks (each benchmark weighs the same, as in the
  paper's "avg" column), and per benchmark the benchmark's mean.
* **Training seeds** (when an arm was trained with several) are resampled with replacement too,
  independently of the problems: a crossed ("pigeonhole") bootstrap for a seeds x problems design
  (Owen, 2007, *The pigeonhole bootstrap*, Ann. Appl. Stat.), so the interval counts both the
  evaluation noise and the training-seed noise. With few seeds (3) the seed part is coarse.
* **Paired comparisons**: every arm uses the *same* problem resample in each replicate (the arms
  were evaluated on the same problems with the same evaluation seed), so the interval of a
  difference is the percentile interval of the replicate differences, which removes the problem
  difficulty that the arms share. With ``paired_seeds`` the seed rows are paired too (row i of
  every arm comes from the same world, e.g. the same pretrained model): one seed resample per
  replicate, shared by all arms, so a difference also loses the world-to-world variation the arms
  share.

Percentile intervals at ``level`` (95 %). numpy only, vectorised: scipy's ``bootstrap`` does not
resample a crossed design or keep one problem resample across several arms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_N_BOOT = 2000


def problem_scores(predictions: Sequence[Mapping], mode: str = "sample") -> dict[str, float]:
    """Per-problem score (the mean of its ``correct`` verdicts) from prediction rows, in first-seen order."""
    hits: dict[str, list[bool]] = {}
    for r in predictions:
        if r["mode"] == mode:
            hits.setdefault(str(r["problem_id"]), []).append(bool(r["correct"]))
    return {pid: sum(v) / len(v) for pid, v in hits.items()}


def _as_matrix(scores) -> np.ndarray:
    """``(seeds, problems)`` float matrix from a vector (one seed) or a list of vectors."""
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (seeds, problems) array, got shape {a.shape}")
    return a


def bootstrap(arms: Mapping[str, Mapping[str, Sequence]], n_boot: int = DEFAULT_N_BOOT,
              seed: int = 0, paired_seeds: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates of each arm's accuracy.

    ``arms``: ``{arm: {benchmark: scores}}`` where ``scores`` is a vector of per-problem scores (one
    evaluation) or a ``(seeds, problems)`` matrix (one row per training seed). Every arm must hold
    the same benchmarks with the same number of problems, in the same problem order (the pairing).

    Returns ``{arm: {benchmark: replicates, "average": replicates}}``, each an ``(n_boot,)`` array;
    the problem resample of replicate b is shared by all arms, the seed resample is drawn per arm,
    or, with ``paired_seeds`` (every arm then has the same number of seed rows), shared as well.
    """
    if not arms:
        raise ValueError("bootstrap: no arms")
    mats = {a: {b: _as_matrix(s) for b, s in benches.items()} for a, benches in arms.items()}
    first = next(iter(mats.values()))
    shape = {b: m.shape[1] for b, m in first.items()}
    for a, benches in mats.items():
        got = {b: m.shape[1] for b, m in benches.items()}
        if got != shape:
            raise ValueError(f"bootstrap: arm {a!r} has benchmarks/problem counts {got}, expected {shape} (the "
                             "arms must be evaluated on the same problems to be compared)")
    rng = np.random.default_rng(seed)
    problem_idx = {b: rng.integers(0, n, size=(n_boot, n)) for b, n in shape.items()}
    shared_idx = None
    if paired_seeds:
        counts = {a: next(iter(benches.values())).shape[0] for a, benches in mats.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"bootstrap: paired seeds need the same number of seed rows in every arm, got {counts}")
        n_rows = next(iter(counts.values()))
        shared_idx = rng.integers(0, n_rows, size=(n_boot, n_rows))
    out: dict[str, dict[str, np.ndarray]] = {}
    for a, benches in mats.items():
        n_seeds = next(iter(benches.values())).shape[0]
        seed_idx = shared_idx if shared_idx is not None else rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        reps = {}
        for b, m in benches.items():
            if m.shape[0] != n_seeds:
                raise ValueError(f"bootstrap: arm {a!r} has {m.shape[0]} seeds on {b!r}, {n_seeds} elsewhere")
            # Mean over the resampled problems for every seed, then over the resampled seeds.
            per_seed = np.stack([m[s][problem_idx[b]].mean(axis=1) for s in range(n_seeds)], axis=1)
            reps[b] = np.take_along_axis(per_seed, seed_idx, axis=1).mean(axis=1)
        reps["average"] = np.mean([reps[b] for b in shape], axis=0)
        out[a] = reps
    return out


def point(scores_by_benchmark: Mapping[str, Sequence]) -> dict[str, float]:
    """The point estimates matching :func:`bootstrap`: per benchmark the mean over seeds and problems,
    and their macro average."""
    out = {b: float(_as_matrix(s).mean()) for b, s in scores_by_benchmark.items()}
    out["average"] = float(np.mean([out[b] for b in scores_by_benchmark]))
    return out


def interval(replicates: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval ``[low, high]`` of bootstrap replicates."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(replicates, dtype=np.float64), [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def half_width(ci: Sequence[float]) -> float:
    return (float(ci[1]) - float(ci[0])) / 2.0
