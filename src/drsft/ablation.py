"""The ablation's statistics: arms x training seeds x problems -> means, 95 % intervals, paired differences.

:mod:`drsft.experiments` runs the arms as queued ``dvc exp run``s and hands their per-problem scores
(the mean of each problem's k verdicts, from ``data/evaluate*/<benchmark>.jsonl``) to
:func:`summarize`, which writes what ``metrics/ablation.json`` holds. The intervals come from
:func:`drsft.stats.bootstrap`: problems resampled within each benchmark and shared by every arm
(paired: the same problems and evaluation seed for all arms), training seeds resampled per arm, or,
when every seed is its own world (``drsft ablation --worlds``), resampled together across the arms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from drsft.stats import DEFAULT_N_BOOT, bootstrap, half_width, interval, point

# (arm, train.data, train.loss): the paper's four arms, then drsft's importance-sampling extensions.
ARMS = [("sft", "expert", "sft"), ("dft", "expert", "dft"), ("dr-sft", "rewritten", "sft"),
        ("dr-dft", "rewritten", "dft")]
IS_ARMS = [("dr-is", "rewritten", "is"), ("dr-is-dft", "rewritten", "is_dft")]
# The comparisons the paper makes (first minus second).
PAIRS = [("dr-dft", "dft"), ("dr-sft", "sft"), ("dr-dft", "base"), ("dft", "sft")]
# The tier ablation: DR without guided re-solving (every problem without a correct sample keeps its
# expert demonstration), by the params each such arm overrides upstream of train, and what it tests.
NOGUIDED_ARMS = [("dr-noguided-dft", "rewritten", "dft")]
ARM_OVERRIDES = {"dr-noguided-dft": ("guided_align.n=0",)}
EXTRA_PAIRS = [("dr-dft", "dr-noguided-dft")]


def summarize(scores: Mapping[str, Mapping[str, Sequence]], pairs: Sequence[tuple[str, str]] = PAIRS,
              n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95, paired_seeds: bool = False) -> dict:
    """``scores``: ``{arm: {benchmark: (seeds, problems) scores}}`` (``base``: one row, or one per
    seed with ``paired_seeds``: row i of every arm from the same world). Returns the ``arms`` and
    ``comparisons`` sections of ``metrics/ablation.json``; pairs naming an absent arm are skipped."""
    reps = bootstrap(scores, n_boot=n_boot, seed=seed, paired_seeds=paired_seeds)
    arms: dict[str, dict] = {}
    for arm, benches in scores.items():
        pt = point(benches)
        mats = {b: np.atleast_2d(np.asarray(s, dtype=np.float64)) for b, s in benches.items()}
        per_seed = np.mean([m.mean(axis=1) for m in mats.values()], axis=0)
        arms[arm] = {
            "avg_at_k": pt["average"],
            "avg_at_k_ci": interval(reps[arm]["average"], level),
            "seeds": int(per_seed.size),
            "per_seed": [float(x) for x in per_seed],
            "benchmarks": {b: {"avg_at_k": pt[b], "avg_at_k_ci": interval(reps[arm][b], level)} for b in benches},
        }
    comparisons: dict[str, dict] = {}
    for x, y in pairs:
        if x not in arms or y not in arms:
            continue
        diff = reps[x]["average"] - reps[y]["average"]
        ci = interval(diff, level)
        comparisons[f"{x}_vs_{y}"] = {
            "diff": arms[x]["avg_at_k"] - arms[y]["avg_at_k"],
            "diff_ci": ci,
            "resolved": bool(ci[0] > 0 or ci[1] < 0),
            "benchmarks": {b: {"diff": arms[x]["benchmarks"][b]["avg_at_k"] - arms[y]["benchmarks"][b]["avg_at_k"],
                               "diff_ci": interval(reps[x][b] - reps[y][b], level)} for b in scores[x]},
        }
    return {"arms": arms, "comparisons": comparisons}


def _pm(value: float, ci: Sequence[float]) -> str:
    return f"{100 * value:.1f} ± {100 * half_width(ci):.1f}"


def format_tables(summary: Mapping, arm_info: Mapping[str, tuple[str, str]] | None = None) -> str:
    """Markdown: one row per arm (``mean ± half-width`` per benchmark and on average), then the paired
    comparisons with their intervals. ``arm_info``: ``{arm: (train.data, train.loss)}``."""
    arms = summary["arms"]
    benches = list(next(iter(arms.values()))["benchmarks"])
    arm_info = arm_info or {}
    lines = ["| arm | train.data | train.loss | seeds | " + " | ".join(benches) + " | average |",
             "|" + "---|" * (5 + len(benches))]
    for name, a in arms.items():
        data, loss = arm_info.get(name, ("—", "—"))
        cells = [_pm(a["benchmarks"][b]["avg_at_k"], a["benchmarks"][b]["avg_at_k_ci"]) for b in benches]
        label = "base model" if name == "base" else name
        lines.append(f"| {label} | {data} | {loss} | {a['seeds']} | " + " | ".join(cells)
                     + f" | **{_pm(a['avg_at_k'], a['avg_at_k_ci'])}** |")
    comps = summary.get("comparisons") or {}
    if comps:
        lines += ["", "| comparison (paired) | difference | 95 % interval | resolved |", "|---|---|---|---|"]
        for name, c in comps.items():
            lo, hi = c["diff_ci"]
            verdict = "yes" if c["resolved"] else "no: inside the noise"
            lines.append(f"| {name.replace('_vs_', ' − ')} | {100 * c['diff']:+.1f} | "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {verdict} |")
    return "\n".join(lines)
