#!/usr/bin/env bash
# GPU smoke test of the whole DAG: rollouts on CUDA (vLLM, data parallel over the GPUs; or the hf
# backend where vllm is not installed), DeepSpeed ZeRO-3 training through the deepspeed launcher,
# bf16, NCCL -- on the toy model (or a small local one), in minutes.
#
# What has run is in the README's "Running at scale" (the run log in docs/results.md).
# UNRUN: the vLLM backend and more than one GPU.
#
# Usage (from the repository, on a CUDA machine):
#   make install TORCH=torch==2.8.0 && .venv/bin/pip install -e '.[gpu]'   # CUDA torch + vllm
#   bash scripts/gpu_smoke.sh
# Environment:
#   PY                 the Python with drsft's dependencies (default: .venv/bin/python, else python3)
#   DRSFT_SMOKE_MODEL  toy (default: the embedded tiny Llama, pretrained by `prepare` in ~1 min) or
#                      a small local model folder / hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct): then
#                      GSM8K (../shared/datasets) trains and MATH500 evaluates.
#                      Note: the toy model's head size is 24; if the vLLM attention backend refuses
#                      it, use a small real model.
#   DRSFT_SMOKE_BACKEND  vllm | hf (default: vllm if it imports, else hf, said in the output)
#   DRSFT_SMOKE_GPUS   GPUs to use (default: all that nvidia-smi lists)
#   DRSFT_SMOKE_CPU=1  dry run of this script on a machine without CUDA (hf backend, fp32, one
#                      process, `python` as launcher): checks the script, not the GPU paths
#   DRSFT_SMOKE_PARAMS_ONLY=1  stop after writing and checking the smoke's params.yaml (what the
#                      test suite runs, so a params change that breaks this script fails CI)
#   KEEP=1             keep the throw-away copy (its path is printed)
# Prints the wall time of `dvc repro`, per-stage seconds, rollout tokens/s of each backend on the
# same prompts, and the sampling and training tokens/s the stages measured.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
MODEL="${DRSFT_SMOKE_MODEL:-toy}"
SHARED="$(cd "$REPO/.." && pwd)/shared"
CPU="${DRSFT_SMOKE_CPU:-0}"

if [ "$CPU" = 1 ]; then
  NGPU=1; BACKEND=hf; DTYPE=auto; LAUNCHER=python
  echo "DRSFT_SMOKE_CPU=1: dry run on CPU (hf backend, fp32, one process); the GPU paths are not exercised"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
  NGPU="${DRSFT_SMOKE_GPUS:-$(nvidia-smi -L | wc -l)}"
  [ "$NGPU" -ge 1 ] || { echo "no GPUs" >&2; exit 1; }
  if [ -n "${DRSFT_SMOKE_BACKEND:-}" ]; then BACKEND="$DRSFT_SMOKE_BACKEND"
  elif "$PY" -c "import vllm" 2>/dev/null; then BACKEND=vllm
  else BACKEND=hf; echo "vllm is not installed: rollouts use the hf backend on CUDA (the vLLM path is NOT exercised)"; fi
  DTYPE=bfloat16; LAUNCHER="deepspeed --num_gpus $NGPU"
fi
"$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
[ "$BACKEND" = vllm ] && "$PY" -c "import vllm; print('vllm', vllm.__version__)"
echo "smoke: model=$MODEL backend=$BACKEND gpus=$NGPU launcher='$LAUNCHER'"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/drsft-gpu-smoke.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then echo "work copy: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# A throw-away copy of the working tree (tracked and untracked-but-not-ignored files), own git repo.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
     [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -cf - -T -) | tar -xf - -C "$WORK"
else   # a copy of the tree without .git (e.g. shipped to a GPU box): everything but outputs
  (cd "$REPO" && tar --exclude=./.git --exclude=./.venv --exclude=./.whl --exclude=./.dvc/cache --exclude=./.dvc/tmp \
     --exclude=./data --exclude=./models --exclude=./metrics --exclude=./dvclive -cf - .) | tar -xf - -C "$WORK"
fi
cd "$WORK"
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
if command -v git >/dev/null; then
  git init -q && git add -A && git -c user.email=smoke@drsft -c user.name=smoke commit -qm smoke
else
  echo "git not found: DVC runs without SCM (core.no_scm)"
  "$PY" -m dvc config core.no_scm true
fi

# Tiny sizes; the rollout backend, ZeRO-3 and the deepspeed launcher.
"$PY" - "$MODEL" "$NGPU" "$SHARED" "$BACKEND" "$DTYPE" "$LAUNCHER" <<'PYEOF'
import sys, yaml
model, ngpu, shared, backend, dtype, launcher = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
p = yaml.safe_load(open("params.yaml"))
p["model"]["base"] = model
pr = p["prepare"]
pr["probe"]["enabled"] = False
if model == "toy":
    pr["source"] = "toy"
    pr["toy"].update(n_train=64, n_bench=16, n_corpus=2000, n_drills=1000)
    pr["pretrain"]["steps"] = 300
    p["evaluate"]["benchmarks"] = ["toy_" + f for f in pr["toy"]["families"]]
else:
    pr["source"] = "files"
    pr["files"]["root"] = shared
    pr["files"]["train"].update(path=f"{shared}/datasets/gsm8k_train.jsonl", problem="question",
                                solution="answer", answer=None, limit=64, subsample=None)
    pr["files"]["benchmarks"] = [{"name": "math500", "path": f"{shared}/benchmarks/math500.jsonl"}]
    p["evaluate"]["benchmarks"] = ["math500"]
p["rollout"].update(backend=backend, dtype=dtype, tensor_parallel_size=1, data_parallel_size=ngpu,
                    gpu_memory_utilization=0.5)
for sec in ("sample", "guided_align"):
    p[sec].update(n=2, max_new_tokens=128, shard_size=32)
p["evaluate"].update(k=2, max_new_tokens=128, greedy=True)
p["train"].update(zero_stage=3, epochs=1, micro_batch_size=2, global_batch_size=4 * ngpu, max_length=512,
                  save_every=2, launcher=launcher)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PYEOF
"$PY" -m drsft.params check params.yaml
if [ "${DRSFT_SMOKE_PARAMS_ONLY:-0}" = 1 ]; then echo "smoke params: OK"; exit 0; fi

export PATH="$(dirname "$PY"):$PATH"   # dvc, deepspeed and `python` of the venv
T0=$(date +%s)
"$PY" -m dvc repro
T1=$(date +%s)
echo "dvc repro (whole DAG, $BACKEND x $NGPU, ZeRO-3 x $NGPU, launcher '$LAUNCHER'): $((T1 - T0)) s"

# ZeRO-3 consolidation: the saved model loads and has the base model's parameter count.
"$PY" - "$BACKEND" <<'PYEOF'
import json, sys
from transformers import AutoModelForCausalLM
from drsft.models import resolve_model
base = AutoModelForCausalLM.from_pretrained(resolve_model("models/base"))
trained = AutoModelForCausalLM.from_pretrained("models/trained")
nb, nt = sum(p.numel() for p in base.parameters()), sum(p.numel() for p in trained.parameters())
assert nb == nt, f"trained model has {nt} parameters, base {nb}: ZeRO-3 consolidation lost weights"
print(f"models/trained: {nt} parameters, consolidated from ZeRO-3 partitions")
import glob
metrics = {f[8:-5]: json.load(open(f)) for f in sorted(glob.glob("metrics/*.json"))}
runs = {f[13:-5]: json.load(open(f)) for f in sorted(glob.glob("metrics/runs/*.json"))}   # timings
m = runs["sample"]
print(f"sample ({sys.argv[1]}): {m['tokens_per_s']:.0f} tok/s over {m['tokens_generated']} tokens, {m['seconds']:.1f} s")
m = runs["train"]
print(f"train (ZeRO-3): {m['tokens_per_s']:.0f} input tok/s, training loop {m['train_time_s']:.1f} s")
print("evaluate:", json.dumps(metrics["evaluate"]["average"]))
print("stage seconds:", {name: m["seconds"] for name, m in runs.items() if "seconds" in m})
PYEOF

# Rollout throughput, same model and prompts: vllm (one GPU, if installed) vs hf (one GPU).
BACKENDS=hf; [ "$BACKEND" = vllm ] && BACKENDS="vllm hf"
for backend in $BACKENDS; do
  CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" "$PY" - "$backend" "$DTYPE" <<'PYEOF'
import sys, time, yaml
from drsft.io import read_jsonl
from drsft.prompts import render_prompt
from drsft.rollout import SamplingParams, make_backend
name = sys.argv[1]
params = yaml.safe_load(open("params.yaml"))
be = make_backend(name, "models/base", dtype=sys.argv[2])
problems = read_jsonl("data/prepare/train.jsonl")[:64]
prompts = [render_prompt(be.tokenizer, p["problem"], params["prompt"]) for p in problems]
sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=128, seed=0, batch_size=256)
be.generate(prompts[:4], sp)  # warm-up
t0 = time.perf_counter()
out = be.generate(prompts, sp)
dt = time.perf_counter() - t0
tokens = sum(len(c.token_ids) for cs in out for c in cs)
print(f"rollout {name}: {tokens} tokens in {dt:.2f} s = {tokens / dt:.0f} tok/s (64 prompts x 4, one GPU)")
PYEOF
done
echo "gpu smoke: OK"
