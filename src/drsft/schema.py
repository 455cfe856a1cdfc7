"""The typed schema of ``params.yaml``: every section, every key, its type and its legal values.

:func:`drsft.params.load_params` validates the whole file with :class:`Params` once, at the start
of every stage, so a typo (an unknown key, ``"yes"`` for a number, ``temperature: -1``, an unknown
``train.loss``, ``zero_stage: 5``) fails in a second with the key path, never hours into a run.

Rules:

* **No defaults here.** ``params.yaml`` is the one place defaults live; every key is required,
  so a config file (``configs/*.yaml``) spells out every value it runs with.
* ``extra="forbid"`` everywhere: an unknown key is an error naming it and the allowed keys.
* Scalars are strict: an integer key rejects ``true``, ``"4"`` and ``4.0``; a boolean rejects
  ``"yes"`` and ``1``; a number rejects strings (PyYAML reads ``3e-3`` -- no dot -- as a string)
  and booleans but accepts integers (``lr: 1`` is ``1.0``); numbers must be finite.
* Cross-field checks sit on the later field (so their error carries that key's path), and the
  checks across sections in :func:`check`.

:func:`check` returns ``(key path, message)`` pairs; :mod:`drsft.params` turns them into one
:class:`~drsft.params.ParamsError` with one line per problem. Validation never rewrites values:
the stages get the file's own dict (a ``1`` stays ``1``; resume fingerprints hash it).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, ValidationInfo
from pydantic import field_validator

from drsft.hubspec import parse_hub_spec

# ----------------------------------------------------------------------------------------------
# Value types

Int = Annotated[int, Strict()]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
PosInt = Annotated[int, Strict(), Field(ge=1)]
Seed = NonNegInt
Num = Annotated[float, Strict(), Field(allow_inf_nan=False)]          # ints accepted, bools/strings not
NonNegNum = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
PosNum = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]     # [0, 1]
TopP = Annotated[float, Strict(), Field(gt=0, le=1, allow_inf_nan=False)]         # (0, 1]
Temperature = NonNegNum                                                           # 0 = greedy
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _benchmark_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"must be a benchmark name of letters, digits, '_', '.', '-' (it names the file "
                         f"<name>.jsonl) (got {_show(value)})")
    return value


def _auto_or_bool(value: Any) -> Any:
    # Literal["auto", True, False] would accept 1 and 0 (1 == True): check the type explicitly.
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(f"must be one of 'auto', true, false (got {_show(value)})")


AutoBool = Annotated[Any, BeforeValidator(_auto_or_bool)]

Backend = Literal["hf", "vllm"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Rule = Literal["random", "shortest", "highest_logprob"]          # drsft.rewrite.SELECTION_RULES
Family = Literal["arith", "linear", "fraction", "decimal", "precedence"]  # drsft.toy.world.FAMILIES
Loss = Literal["sft", "dft", "is", "is_dft"]                     # drsft.losses.LOSS_KINDS
IsLevel = Literal["token", "sequence"]                           # drsft.losses.IS_LEVELS
TrainData = Literal["rewritten", "expert", "self"]               # drsft.train.DATA_KINDS
LossNorm = Literal["global_token_mean", "micro_batch_token_mean_sum"]   # drsft.train.LOSS_NORMS
PromptFormat = Literal["sampling", "question"]                   # drsft.train.PROMPT_FORMATS
ResponseEnd = Literal["end_of_turn", "eos"]                      # drsft.train.RESPONSE_ENDS
LrSchedule = Literal["drsft", "verl"]                            # drsft.train.LR_SCHEDULES


def _keep(value: Any) -> Any:
    """A positive integer, or ``"all"`` (every distinct correct, finished candidate)."""
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"must be a positive integer or 'all' (got {_show(value)})")


Keep = Annotated[Any, BeforeValidator(_keep)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _unique(values: list, what: str = "entry") -> list:
    seen: set = set()
    for v in values:
        if v in seen:
            raise ValueError(f"duplicate {what} {_show(v)}")
        seen.add(v)
    return values


def _greedy_n(n: int | None, temperature: float | None, n_key: str) -> None:
    """temperature 0 is greedy decoding: every one of n samples would be the same sequence."""
    if temperature is not None and n is not None and temperature == 0 and n > 1:
        raise ValueError(f"temperature 0 is greedy decoding: the {n} samples ({n_key}) would be identical; "
                         f"use temperature > 0 or {n_key}: 1")


# ----------------------------------------------------------------------------------------------
# Sections


class Decoding(_Section):
    """The decoding keys that ``sample``, ``guided_align``, ``evaluate`` and ``prepare.probe`` share
    (drsft.rollout.SamplingParams.from_params). Subclasses add their own count of samples (``n``,
    or evaluate's ``k``), validated after these, so a greedy check on it sees the temperature."""

    temperature: Temperature
    top_p: TopP
    max_new_tokens: PosInt
    seed: Seed


class ModelSection(_Section):
    base: NonEmptyStr                  # "toy" | a hub id | a local path
    trust_remote_code: Bool


class PromptSection(_Section):
    system: Str | None                 # null or "": no system turn
    instruction: Str
    guided_template: NonEmptyStr

    @field_validator("guided_template")
    @classmethod
    def _template(cls, value: str) -> str:
        for field in ("{problem}", "{hint}"):
            if field not in value:
                raise ValueError(f"must contain {field}")
        try:
            value.format(problem="", hint="", instruction="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"is not a valid format string with the fields {{problem}}, {{hint}}, "
                             f"{{instruction}} ({type(exc).__name__}: {exc}); write a literal brace as {{{{ or }}}}") from None
        return value


class ToySection(_Section):
    n_train: PosInt
    n_bench: PosInt
    n_corpus: PosInt
    families: Annotated[list[Family], Field(min_length=1)]
    mistake_rate: Fraction
    guided_frac: Fraction
    guided_mistake_rate: Fraction
    misconception_rate: Fraction
    textbook_frac: Fraction
    misconceived_textbook_frac: Fraction
    expert_model_style_frac: Fraction
    n_drills: NonNegInt
    drill_facts: PosInt

    @field_validator("families")
    @classmethod
    def _families(cls, value: list) -> list:
        return _unique(value, "family")


class PretrainSection(_Section):
    """drsft.toy.tinylm.pretrain keyword arguments (the embedded tiny Llama)."""

    vocab_size: PosInt
    hidden_size: PosInt
    num_layers: PosInt
    num_heads: PosInt
    intermediate_size: PosInt
    steps: PosInt
    batch_size: PosInt
    lr: PosNum
    warmup_steps: NonNegInt
    weight_decay: NonNegNum
    grad_clip: NonNegNum               # 0 = off
    max_length: Annotated[int, Strict(), Field(ge=2)]
    threads: PosInt                    # per process
    processes: PosInt                  # data-parallel CPU processes (gloo)
    log_every: PosInt
    drill_frac: Annotated[float, Strict(), Field(ge=0, lt=1, allow_inf_nan=False)]
    drill_batch_size: PosInt | None    # null: batch_size
    seed: NonNegInt | None             # the pretraining run (init, batch order); null: prepare.seed

    @field_validator("num_heads")
    @classmethod
    def _heads(cls, value: int, info: ValidationInfo) -> int:
        hidden = info.data.get("hidden_size")
        if hidden is not None and hidden % value:
            raise ValueError(f"must divide prepare.pretrain.hidden_size ({hidden}) (got {value})")
        return value


class ProbeSection(Decoding):
    """drsft.toy.probe.probe_world config plus the verifier settings the stage passes it."""

    enabled: AutoBool                  # auto: only for model.base toy
    n_problems: PosInt
    n: PosInt
    batch_size: PosInt
    backend: Backend
    data_parallel_size: PosInt         # hf on CPU: forked single-thread workers
    solve_rate_min: Fraction
    solve_rate_max: Fraction
    unsolved_min: Fraction
    headroom_solve_max: Fraction
    headroom_margin: Fraction
    gap_ratio_min: PosNum
    gap_ratio_max: PosNum
    gap_nll_max: PosNum
    verify_workers: NonNegInt
    verify_timeout_s: PosNum

    @field_validator("n")
    @classmethod
    def _greedy(cls, value: int, info: ValidationInfo) -> int:
        _greedy_n(value, info.data.get("temperature"), "prepare.probe.n")
        return value

    @field_validator("solve_rate_max", "gap_ratio_max")
    @classmethod
    def _not_below_min(cls, value: float, info: ValidationInfo) -> float:
        key = info.field_name.replace("_max", "_min")
        low = info.data.get(key)
        if low is not None and value < low:
            raise ValueError(f"must be >= prepare.probe.{key} ({low}) (got {value})")
        return value


class TrainFile(_Section):
    """drsft.data.load_problems arguments: the file and its field mapping."""

    path: NonEmptyStr                  # jsonl / parquet inside files.root, or owner/name[:config]@revision[#split]
    problem: NonEmptyStr
    solution: NonEmptyStr
    answer: NonEmptyStr | None         # null: from the solution (GSM8K "#### x", else last \boxed{})
    limit: NonNegInt | None            # first rows only
    source: NonEmptyStr | None         # null: the file stem
    subsample: PosInt | None           # null: every row


class BenchmarkFile(_Section):
    name: NonEmptyStr
    path: NonEmptyStr

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _benchmark_name(value)


class FilesSection(_Section):
    root: NonEmptyStr                  # the folder of every local input: prepare depends on it (dvc.yaml)
    train: TrainFile
    benchmarks: list[BenchmarkFile]

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, value: list[BenchmarkFile]) -> list[BenchmarkFile]:
        _unique([b.name for b in value], "benchmark name")
        return value


class PrepareSection(_Section):
    source: Literal["toy", "files"]
    seed: Seed
    toy: ToySection
    pretrain: PretrainSection
    probe: ProbeSection
    files: FilesSection


class RolloutSection(_Section):
    backend: Backend
    batch_size: PosInt                 # sequences per generate call (hf)
    dtype: Dtype
    tensor_parallel_size: PosInt       # vllm
    gpu_memory_utilization: TopP       # vllm, (0, 1]
    data_parallel_size: PosInt         # vllm engines / GPUs per rollout; hf on CPU: worker processes
    stop_token_ids: list[NonNegInt]    # extra ids to stop at (besides EOS ids and the end of turn)


class RecordsSection(_Section):
    format: Literal["jsonl", "parquet"]   # drsft.io.RECORD_FORMATS
    logprob_dtype: Literal["float32", "float16"]   # drsft.io.LOGPROB_DTYPES; float16 with parquet only

    @field_validator("logprob_dtype")
    @classmethod
    def _dtype_needs_parquet(cls, value: str, info: ValidationInfo) -> str:
        if value != "float32" and info.data.get("format") != "parquet":
            raise ValueError(f"{value} needs records.format parquet (JSON lines keep every log-prob at full "
                             f"precision)")
        return value


class SampleSection(Decoding):
    n: PosInt
    shard_size: PosInt

    @field_validator("n")
    @classmethod
    def _greedy(cls, value: int, info: ValidationInfo) -> int:
        _greedy_n(value, info.data.get("temperature"), "sample.n")
        return value


class VerifySection(_Section):
    timeout_s: PosNum
    workers: NonNegInt                 # <= 1: in the stage's own process
    mode: Literal["boxed", "paper"]    # answer extraction (drsft.verify.extract_answer)


class SelfAlignSection(_Section):
    keep_per_problem: Keep             # an int, or "all": every distinct correct, finished sample
    rule: Rule
    seed: Seed


class GuidedAlignSection(Decoding):
    n: NonNegInt                       # 0 = no guided re-solving (the tier ablation)
    keep_per_problem: Keep             # an int, or "all"
    rule: Rule
    max_shared_ngram: NonNegInt        # 0 = no copy check
    leak_phrases: list[NonEmptyStr]
    score_batch_size: PosInt
    shard_size: PosInt                 # problems per generation shard (the unit of resume)
    score_shard_size: PosInt           # chosen re-solves per scoring shard (the unit of resume)

    @field_validator("n")
    @classmethod
    def _greedy(cls, value: int, info: ValidationInfo) -> int:
        _greedy_n(value, info.data.get("temperature"), "guided_align.n")
        return value

    @field_validator("leak_phrases")
    @classmethod
    def _phrases(cls, value: list) -> list:
        return _unique(value, "phrase")


class FallbackSection(_Section):
    score_batch_size: PosInt
    shard_size: PosInt                 # problems per scoring shard (the unit of resume)


def _is_clip(value: Any) -> Any:
    """[low, high]: 0 <= low <= high, high > 0 or null (no cap)."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"must be [low, high] (high: null = no cap) (got {_show(value)})")
    low, high = value
    if not number(low) or low < 0:
        raise ValueError(f"low must be a number >= 0 (got {_show(value)})")
    if high is not None and (not number(high) or high <= 0 or high < low):
        raise ValueError(f"high must be null or a number > 0 and >= low (got {_show(value)})")
    return value


def _target_modules(value: Any) -> Any:
    """peft's ``target_modules``: ``all-linear``, or a non-empty list of module names."""
    if value == "all-linear" or (isinstance(value, list) and value
                                 and all(isinstance(v, str) and v for v in value)):
        return value
    raise ValueError(f"must be 'all-linear' or a list of module names (got {_show(value)})")


class LoraSection(_Section):
    """drsft.train.lora_config: peft LoRA adapters; ``r: 0`` is full fine-tuning."""

    r: NonNegInt
    alpha: PosNum
    dropout: Annotated[float, Strict(), Field(ge=0, lt=1, allow_inf_nan=False)]
    target_modules: Annotated[Any, BeforeValidator(_target_modules)]


def _adam_betas(value: Any) -> Any:
    """[beta1, beta2], each in [0, 1)."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)):
        raise ValueError(f"must be [beta1, beta2], each a number in [0, 1) (got {_show(value)})")
    return value


class TrainSection(_Section):
    data: TrainData
    loss: Loss
    loss_norm: LossNorm                # drsft.train.micro_batch_normaliser
    prompt_format: PromptFormat        # the prompt a training row conditions on (drsft.train.load_examples)
    response_end: ResponseEnd          # the token a training response ends with
    is_clip: Annotated[list, BeforeValidator(_is_clip)]
    is_level: IsLevel
    zero_stage: Annotated[int, Strict(), Field(ge=0, le=3)]
    lr: PosNum
    epochs: PosInt
    micro_batch_size: PosInt
    global_batch_size: PosInt
    max_length: Annotated[int, Strict(), Field(ge=2)]
    warmup_ratio: Fraction
    lr_schedule: LrSchedule            # drsft.train.lr_factor
    weight_decay: NonNegNum
    weight_decay_1d: Bool              # also decay 1-d parameters (norms, biases)
    drop_last: Bool                    # drop each epoch's last, short global batch
    adam_betas: Annotated[list, BeforeValidator(_adam_betas)]
    grad_clip: NonNegNum               # 0 = off
    lora: LoraSection
    gradient_checkpointing: Bool
    packing: Bool                      # a micro-batch's rows as one padding-free packed sequence
    logprob_chunk: NonNegInt           # positions per chunk of the log-prob head; 0: the full logits
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"]   # drsft.train.attention_implementation
    batching: Literal["rows", "tokens"]  # micro-batches of micro_batch_size rows, or by token budget
    max_tokens_per_micro_batch: PosInt   # batching: tokens -- the budget (packed: sum of lengths)
    save_every: PosInt
    seed: Seed
    launcher: NonEmptyStr              # the command that runs stages/train.py (dvc.yaml cmd)

    @field_validator("prompt_format")
    @classmethod
    def _behaviour_needs_the_sampling_prompt(cls, value: str, info: ValidationInfo) -> str:
        loss = info.data.get("loss")
        if value == "question" and loss in ("is", "is_dft"):
            raise ValueError(f"question trains on another prompt than the one the behaviour log-probs were "
                             f"recorded under, which train.loss {loss} divides by; use train.prompt_format "
                             f"sampling with is / is_dft, or train.loss sft / dft")
        return value

    @field_validator("global_batch_size")
    @classmethod
    def _multiple(cls, value: int, info: ValidationInfo) -> int:
        micro = info.data.get("micro_batch_size")
        if micro is not None and value % micro:
            raise ValueError(f"must be a multiple of train.micro_batch_size ({micro}) (got {value})")
        return value

    @field_validator("max_tokens_per_micro_batch")
    @classmethod
    def _budget_holds_a_row(cls, value: int, info: ValidationInfo) -> int:
        longest = info.data.get("max_length")
        if info.data.get("batching") == "tokens" and longest is not None and value < longest:
            raise ValueError(f"must be >= train.max_length ({longest}) with batching: tokens, so that every row "
                             f"fits in a micro-batch (got {value})")
        return value

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class EvaluateSection(Decoding):
    benchmarks: Annotated[list[NonEmptyStr], Field(min_length=1)]
    k: PosInt
    greedy: Bool                       # also a greedy (temperature 0) pass
    n_boot: Annotated[int, Strict(), Field(ge=100)]   # bootstrap resamples of the 95 % intervals
    shard_size: PosInt                 # problems per evaluation shard (the unit of resume)

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            try:
                _benchmark_name(name)
            except ValueError as exc:
                raise ValueError(f"[{i}] {exc}") from None
        return _unique(value, "benchmark")

    @field_validator("greedy")
    @classmethod
    def _greedy(cls, value: bool, info: ValidationInfo) -> bool:
        temperature, k = info.data.get("temperature"), info.data.get("k")
        if temperature == 0 and k is not None and k > 1:
            raise ValueError(f"evaluate.temperature 0 is greedy decoding: the {k} samples (evaluate.k) would be "
                             "identical; use temperature > 0 or k: 1")
        if temperature == 0 and value:
            raise ValueError("evaluate.temperature 0 already decodes greedily: greedy: true would repeat it")
        return value


class Params(_Section):
    model: ModelSection
    prompt: PromptSection
    prepare: PrepareSection
    rollout: RolloutSection
    records: RecordsSection
    sample: SampleSection
    verify: VerifySection
    self_align: SelfAlignSection
    guided_align: GuidedAlignSection
    fallback: FallbackSection
    train: TrainSection
    evaluate: EvaluateSection


# ----------------------------------------------------------------------------------------------
# Checks across sections (run once every section is valid)


def prepared_benchmarks(p: Params) -> list[str]:
    """The benchmark names ``prepare`` writes for these params."""
    if p.prepare.source == "toy":
        return [f"toy_{f}" for f in p.prepare.toy.families]
    return [b.name for b in p.prepare.files.benchmarks]


def cross_section_problems(p: Params) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if p.model.base == "toy" and p.prepare.source != "toy":
        out.append(("model.base", "'toy' is pretrained on the toy world: it needs prepare.source: toy "
                                  f"(got prepare.source {_show(p.prepare.source)})"))
    if p.model.base == "toy" and p.prepare.pretrain.drill_frac > 0 and p.prepare.toy.n_drills == 0:
        out.append(("prepare.pretrain.drill_frac", f"is {p.prepare.pretrain.drill_frac} but prepare.toy.n_drills is 0 "
                                                   "(no drills to train on)"))
    if p.prepare.source == "files":
        out += _input_problems(p.prepare.files)
    prepared = prepared_benchmarks(p)
    for i, name in enumerate(p.evaluate.benchmarks):
        if name not in prepared:
            where = "prepare.toy.families" if p.prepare.source == "toy" else "prepare.files.benchmarks"
            out.append((f"evaluate.benchmarks[{i}]",
                        f"{_show(name)} is not a benchmark prepare writes (from {where}: "
                        f"{', '.join(map(repr, prepared)) or 'none'})"))
    return out


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (lexically, both relative to the repo root)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return rel == "." or not (rel == ".." or rel.startswith(".." + os.sep))


# prepare's outputs (dvc.yaml): the inputs' folder must not contain them.
_PREPARE_OUTS = ("data/prepare", "models/base")


def _input_problems(files: FilesSection) -> list[tuple[str, str]]:
    """Local inputs must lie in ``files.root`` (prepare's declared dep, so replacing a file reruns
    prepare); a pinned ``datasets`` id (drsft.hubspec) is not a local file."""
    out: list[tuple[str, str]] = []
    root = files.root
    for outp in _PREPARE_OUTS:
        if _inside(outp, root):
            out.append(("prepare.files.root", f"{_show(root)} contains prepare's own output {outp}: "
                                              "name the folder that holds the input files"))
    named = [("prepare.files.train.path", files.train.path)]
    named += [(f"prepare.files.benchmarks[{i}].path", b.path) for i, b in enumerate(files.benchmarks)]
    for key, path in named:
        hub = parse_hub_spec(path)
        if (hub is not None and hub.revision) or _inside(path, root):
            continue
        out.append((key, f"{_show(path)} is outside prepare.files.root ({_show(root)}): prepare depends on that "
                         "folder, so a file elsewhere could change without prepare rerunning. Put the file "
                         "there, point the root at its folder, or name a pinned datasets id "
                         "owner/name[:config]@<commit>"))
    return out


# ----------------------------------------------------------------------------------------------
# Errors: pydantic's -> (key path, one-line message)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """The model class (or list item type) inside Annotated / Optional / list."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _annotation_at(loc: tuple) -> Any:
    """The declared type at ``loc`` (None where it cannot be followed)."""
    tp: Any = Params
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            if typing.get_origin(tp) is not list:
                return None
            tp = typing.get_args(tp)[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return None
    return tp


def _allowed_keys(loc: tuple) -> list[str]:
    tp = _unwrap(_annotation_at(loc))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _literal_values(loc: tuple) -> list:
    tp = _unwrap(_annotation_at(loc))
    return list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else []


def _yaml_number_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a quoted number is a string: write it without quotes)"
    return ""


def _message(err: Mapping[str, Any]) -> str:
    kind, loc, value, ctx = err["type"], tuple(err["loc"]), err.get("input"), err.get("ctx") or {}
    got = f" (got {_show(value)})"
    if kind == "missing":
        return "missing required key (params.yaml has every key with its default)"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return "unknown key" + (f" ({hint}allowed: {', '.join(allowed)})" if allowed else "")
    if kind == "literal_error":
        values = _literal_values(loc) or [ctx.get("expected")]
        return f"must be one of {', '.join(map(repr, values))}{got}"
    if kind == "int_type":
        return f"must be an integer{got}"
    if kind == "float_type":
        return f"must be a number{got}{_yaml_number_hint(value)}"
    if kind == "finite_number":
        return f"must be a finite number{got}"
    if kind == "bool_type":
        return f"must be true or false{got}"
    if kind == "string_type":
        return f"must be a string{got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys{got}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list{got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s){got}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s){got}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {bound}{got}"
    if kind == "value_error":
        msg = str(ctx.get("error", err.get("msg", "")))
        return msg.removeprefix("Value error, ")
    return f"{err.get('msg', kind)}{got}"


def check(data: Any) -> list[tuple[str, str]]:
    """Every problem of a parsed params file as ``(key path, message)``; empty when it is valid."""
    if not isinstance(data, Mapping):
        return [("(top level)", f"must be a mapping of sections (got {_show(data)})")]
    try:
        parsed = Params.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            msg = _message(err)
            # validators that report a list index themselves: "[i] message"
            m = re.match(r"\[(\d+)\] (.*)", msg, re.S)
            if m:
                loc, msg = loc + (int(m.group(1)),), m.group(2)
            problems.append((_path(loc) or "(top level)", msg))
        return problems
    return cross_section_problems(parsed)


def check_section(name: str, data: Any) -> list[tuple[str, str]]:
    """The problems of one section (e.g. ``train``) on its own, paths prefixed with its name: for
    library callers that get a section without a whole params file (benches, tests)."""
    model = Params.model_fields[name].annotation
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return [(_path((name, *err["loc"])), _message({**err, "loc": (name, *err["loc"])}))
                for err in exc.errors(include_url=False)]
    return []


__all__ = ["Params", "Decoding", "check", "check_section", "cross_section_problems", "prepared_benchmarks"]
