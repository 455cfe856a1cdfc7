"""The ablation's statistics: arms x training seeds x problems -> means, 95 % intervals, paired differences.

:mod:`drsft.experiments` runs the arms as queued ``dvc exp run``s and hands their per-problem scores
(the mean of each problem's k verdicts, from ``data/evaluate*/<benchmark>.jsonl``) to
:func:`summarize`, which writes what ``metrics/ablation.json`` holds. The intervals come from
:func:`drsft.stats.bootstrap`: problems resampled within each benchmark and shared by every arm
(paired: the same problems and evaluation seed for all arms), training seeds resampled per arm, or,
when every seed is its own world (``drsft ablation --worlds``), resampled together across the arms.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np

from drsft.stats import DEFAULT_N_BOOT, bootstrap, half_width, interval, point

# (arm, train.data, train.loss): the paper's four arms, then drsft's importance-sampling extensions.
ARMS = [("sft", "expert", "sft"), ("dft", "expert", "dft"), ("dr-sft", "rewritten", "sft"),
        ("dr-dft", "rewritten", "dft")]
IS_ARMS = [("dr-is", "rewritten", "is"), ("dr-is-dft", "rewritten", "is_dft")]
# The comparisons between the paper's arms that its table is read for (first minus second).
PAIRS = [("dr-dft", "dft"), ("dr-sft", "sft"), ("dr-dft", "base"), ("dft", "sft")]
# The tier ablation: DR without guided re-solving (every problem without a correct sample keeps its
# expert demonstration), by the params each such arm overrides upstream of train, and what it tests.
NOGUIDED_ARMS = [("dr-noguided-dft", "rewritten", "dft")]
# Which part of rewriting carries the benefit: rejection-sampling fine-tuning on the self tier alone
# (train.data self), DR without guided re-solving under either loss, and every correct sample kept.
TIER_ARMS = [("rft", "self", "sft"), ("dr-noguided-sft", "rewritten", "sft"), ("dr-noguided-dft", "rewritten", "dft"),
             ("dr-sft-keepall", "rewritten", "sft"), ("dr-dft-keepall", "rewritten", "dft")]
# The parity options (docs/parity.md): DR+DFT with one choice of the paper's code each, with all of
# its train options together, and with every correct sample kept (the paper's text is silent on it).
PARITY_ARMS = [("dr-dft-mbnorm", "rewritten", "dft"), ("dr-dft-question", "rewritten", "dft"),
               ("dr-dft-keepall", "rewritten", "dft"), ("dr-dft-paper", "rewritten", "dft")]
# LoRA adapters (peft, r 8) instead of full fine-tuning, on the rewritten data with DFT.
LORA_ARMS = [("dr-dft-lora", "rewritten", "dft")]
PAPER_TRAIN = ("train.loss_norm=micro_batch_token_mean_sum", "train.prompt_format=question", "train.response_end=eos",
               "train.weight_decay_1d=true", "train.drop_last=true", "train.lr_schedule=verl")
ARM_OVERRIDES = {"dr-noguided-dft": ("guided_align.n=0",), "dr-noguided-sft": ("guided_align.n=0",),
                 "dr-sft-keepall": ("self_align.keep_per_problem=all",),
                 "dr-dft-mbnorm": ("train.loss_norm=micro_batch_token_mean_sum",),
                 "dr-dft-question": ("train.prompt_format=question",),
                 "dr-dft-keepall": ("self_align.keep_per_problem=all",),
                 "dr-dft-paper": PAPER_TRAIN,
                 "dr-dft-lora": ("train.lora.r=8",)}
# The comparisons the optional arms answer: guided re-solving's share, and drsft's IS weights on the
# rewritten data against the same loss without them (skipped when an arm was not run).
# The paper's table's other relations (both models: SFT < DR+SFT < DFT < DR+DFT; DFT and DR+DFT above
# the base model; SFT above it for Qwen2.5-Math-7B, below for Llama-3.1-8B-Instruct).
RELATION_PAIRS = [("sft", "base"), ("dft", "base"), ("dr-sft", "base"), ("dft", "dr-sft"), ("dr-dft", "dr-sft")]
EXTRA_PAIRS = RELATION_PAIRS + [("rft", "sft"), ("rft", "base"), ("dr-sft", "rft"), ("dr-sft", "dr-noguided-sft"),
                                ("dr-sft-keepall", "dr-sft"), ("dr-dft", "dr-noguided-dft"), ("dr-is", "dr-sft"), ("dr-is-dft", "dr-dft"),
               ("dr-dft-mbnorm", "dr-dft"), ("dr-dft-question", "dr-dft"), ("dr-dft-keepall", "dr-dft"),
               ("dr-dft-paper", "dr-dft"), ("dr-dft-lora", "dr-dft")]


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom, by bisection on its CDF
    (the density integrated numerically); hand-written because scipy is not a dependency."""
    import math

    if df < 1 or not 0.5 <= q < 1:
        raise ValueError(f"t_quantile: need df >= 1 and 0.5 <= q < 1, got df={df}, q={q}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        # substitute t = tan(u): the density over [0, x] becomes a smooth integrand on [0, atan x]
        u = np.linspace(0.0, math.atan(x), 20001)
        f = c * (1 + np.tan(u) ** 2 / df) ** (-(df + 1) / 2) / np.cos(u) ** 2
        return 0.5 + float(np.sum((f[1:] + f[:-1]) / 2) * (u[1] - u[0]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def world_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """``mean ± t(n-1) · sd / sqrt(n)`` over independent units (here: one value per world); None
    below two units. The crossed bootstrap resamples only the units it has, so with 3 worlds it
    cannot reach beyond the smallest and largest of them; this interval can."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    half = t_quantile(1 - (1 - level) / 2, v.size - 1) * float(v.std(ddof=1)) / float(np.sqrt(v.size))
    return [float(v.mean() - half), float(v.mean() + half)]


def summarize(scores: Mapping[str, Mapping[str, Sequence]], pairs: Sequence[tuple[str, str]] = PAIRS,
              n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95, paired_seeds: bool = False) -> dict:
    """``scores``: ``{arm: {benchmark: (seeds, problems) scores}}`` (``base``: one row, or one per
    seed with ``paired_seeds``: row i of every arm from the same world). Returns the ``arms`` and
    ``comparisons`` sections of ``metrics/ablation.json``; pairs naming an absent arm are skipped.

    With ``paired_seeds`` (one world per seed) every arm and comparison also gets ``world_ci``, the
    t interval over the per-world values (:func:`world_interval`), and ``ci``, the union of the two
    intervals: what the table shows and what ``resolved`` (the comparison's ``ci`` excludes 0) uses.
    Otherwise ``ci`` is the bootstrap interval."""
    reps = bootstrap(scores, n_boot=n_boot, seed=seed, paired_seeds=paired_seeds)
    arms: dict[str, dict] = {}
    rows: dict[tuple[str, str], np.ndarray] = {}  # (arm, benchmark) -> per-seed means
    for arm, benches in scores.items():
        pt = point(benches)
        mats = {b: np.atleast_2d(np.asarray(s, dtype=np.float64)) for b, s in benches.items()}
        per_seed = np.mean([m.mean(axis=1) for m in mats.values()], axis=0)
        boot = interval(reps[arm]["average"], level)
        arms[arm] = {
            "avg_at_k": pt["average"],
            "avg_at_k_ci": boot,
            "seeds": int(per_seed.size),
            "per_seed": [float(x) for x in per_seed],
            "benchmarks": {b: {"avg_at_k": pt[b], "avg_at_k_ci": interval(reps[arm][b], level)} for b in benches},
        }
        arms[arm].update(_widened(boot, per_seed, level, paired_seeds))
        for b, m in mats.items():
            cell = arms[arm]["benchmarks"][b]
            rows[(arm, b)] = m.mean(axis=1)
            cell.update(_widened(cell["avg_at_k_ci"], rows[(arm, b)], level, paired_seeds))
    comparisons: dict[str, dict] = {}
    for x, y in pairs:
        if x not in arms or y not in arms:
            continue
        diff = reps[x]["average"] - reps[y]["average"]
        boot = interval(diff, level)
        per_world = np.asarray(arms[x]["per_seed"]) - np.asarray(arms[y]["per_seed"]) if paired_seeds else None
        wide = _widened(boot, per_world, level, paired_seeds)
        ci = wide["ci"]
        comparisons[f"{x}_vs_{y}"] = {
            "diff": arms[x]["avg_at_k"] - arms[y]["avg_at_k"],
            "diff_ci": boot,
            **({"per_world": [float(d) for d in per_world]} if paired_seeds else {}),
            **wide,
            "resolved": bool(ci[0] > 0 or ci[1] < 0),
            "benchmarks": {},
        }
        for b in scores[x]:
            b_boot = interval(reps[x][b] - reps[y][b], level)
            comparisons[f"{x}_vs_{y}"]["benchmarks"][b] = {
                "diff": arms[x]["benchmarks"][b]["avg_at_k"] - arms[y]["benchmarks"][b]["avg_at_k"],
                "diff_ci": b_boot,
                **_widened(b_boot, rows[(x, b)] - rows[(y, b)] if paired_seeds else None, level, paired_seeds)}
    return {"arms": arms, "comparisons": comparisons}


def _widened(boot: list[float], per_world, level: float, paired_seeds: bool) -> dict:
    """``{"ci": ...}`` and, with worlds, ``world_ci``: ``ci`` is the union of both intervals."""
    if not paired_seeds:
        return {"ci": boot}
    w = world_interval(per_world, level)
    if w is None:
        return {"world_ci": None, "ci": boot}
    return {"world_ci": w, "ci": [min(boot[0], w[0]), max(boot[1], w[1])]}


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
        cells = [_pm(a["benchmarks"][b]["avg_at_k"], a["benchmarks"][b]["ci"]) for b in benches]
        label = "base model" if name == "base" else name
        lines.append(f"| {label} | {data} | {loss} | {a['seeds']} | " + " | ".join(cells)
                     + f" | **{_pm(a['avg_at_k'], a['ci'])}** |")
    comps = summary.get("comparisons") or {}
    worlds = any("world_ci" in c for c in comps.values())

    def span(ci) -> str:
        return "—" if ci is None else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"

    if comps:
        head = ("| comparison (paired) | difference | per world | bootstrap 95 % | over worlds (t) 95 % | resolved |"
                if worlds else "| comparison (paired) | difference | 95 % interval | resolved |")
        lines += ["", head, "|" + "---|" * (6 if worlds else 4)]
        for name, c in comps.items():
            verdict = "yes" if c["resolved"] else "no: inside the noise"
            cells = [name.replace("_vs_", " − "), f"{100 * c['diff']:+.1f}"]
            if worlds:
                cells += [", ".join(f"{100 * d:+.1f}" for d in c.get("per_world", [])), span(c["diff_ci"]),
                          span(c.get("world_ci"))]
            else:
                cells.append(span(c["diff_ci"]))
            lines.append("| " + " | ".join(cells + [verdict]) + " |")
    return "\n".join(lines)
