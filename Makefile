# drsft — two commands on a fresh machine:  make repro   and   make test
#
# Install recipe (why it looks like this):
# * torch is installed FIRST and pinned (TORCH, default the CPU build 2.13.0 that lies on this
#   workplace's disk). Every later requirement (transformers, deepspeed, accelerate, ...) then
#   finds torch satisfied; a plain `torch` requirement on a fresh venv would pull GBs of CUDA wheels.
# * DeepSpeed ships as an sdist whose setup.py imports torch. pip's default build isolation would
#   install a second, CUDA torch into the throw-away build env; `--no-build-isolation` makes it
#   build against the torch already in the venv. DS_BUILD_OPS=0 (the default, set explicitly)
#   compiles no CUDA/C++ ops at install time: on CPU we use torch's AdamW and gloo, so none are
#   needed; on GPUs DeepSpeed JIT-compiles the ops it needs on first use.
# * pip reads the machine's pip.conf (local wheel folders/constraints) when present.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.drsft-installed

.PHONY: install repro test test-fast test-world bench ablation clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)"
	awk '/^deepspeed==/{p=1} p{print} p&&!/\\$$/{exit}' requirements.lock > $(VENV)/deepspeed.lock
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation --no-deps --require-hashes -r $(VENV)/deepspeed.lock
	$(PIP) install -q --no-deps --require-hashes -r requirements.lock
	$(PIP) install -q --no-deps -e .
	$(PIP) check
	$(PY) -c "import torch, deepspeed, transformers, dvc, math_verify; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
	touch $@

# Refresh requirements.lock from pyproject.toml (uv, with hashes; torch excluded: installed first, as
# above). Pins that still satisfy pyproject.toml are kept; LOCK_UPGRADE=1 takes the newest allowed.
# LOCK_ARGS: where the pinned torch wheel comes from, for the resolution (this workplace: /opt/wheels).
LOCK_ARGS ?= --find-links /opt/wheels
LOCK_UPGRADE ?=
.PHONY: lock
lock: install
	$(PIP) install -q uv
	head -5 requirements.lock > $(VENV)/lock-header
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch.constraint
	$(VENV)/bin/uv pip compile --quiet pyproject.toml --extra dev --generate-hashes --python $(PY) -c $(VENV)/torch.constraint \
	  --no-build-isolation-package deepspeed --no-emit-package torch --no-header --no-annotate \
	  $(if $(LOCK_UPGRADE),--upgrade) $(LOCK_ARGS) -o requirements.lock
	cat $(VENV)/lock-header requirements.lock > $(VENV)/lock-new && mv $(VENV)/lock-new requirements.lock

# Stage commands call `python`: the venv's, through PATH.
repro: install
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

# Artifacts (data/, models/) to and from the DVC remote. Default: the `localstore` remote of
# .dvc/config, a directory beside the repo (../drsft-dvc-remote, created by the first push).
# Another remote: `make push DVC_REMOTE=s3` (see docs/remote.md).
DVC_REMOTE ?=
.PHONY: push pull

push: install
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc push $(if $(DVC_REMOTE),-r $(DVC_REMOTE))

pull: install
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc pull $(if $(DVC_REMOTE),-r $(DVC_REMOTE))

# CI runs `make test`. The default world's full prepare (`world` marker, ~8 min with its probe) runs in `make test-world`;
# `make repro` measures the same properties (metrics/probe.json world.checks, held by tests/test_world.py).
test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests -m "not world" --durations=20

test-fast: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests -m "not slow and not world"

test-world: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests -m world

# The paper's comparison: SFT, DFT, DR+SFT, DR+DFT x 3 seeds queued as `dvc exp run`s; writes
# metrics/ablation.json (means, 95 % intervals, paired differences) and prints the table. With the toy
# model each seed is also its own pretrained base model (--worlds): the intervals then hold across machines.
# ABLATION_ARGS: --seeds N, --arms A, --with-is, --with-noguided, --no-worlds, --jobs N, --plots DIR,
# --table-only (`drsft ablation --help`).
# The default is what made the committed metrics/ablation.json (3 worlds resolve nothing: docs/results.md).
ABLATION_ARGS ?= --seeds 6
ablation: install
	PATH="$(abspath $(VENV))/bin:$$PATH" drsft ablation $(ABLATION_ARGS)

# Beyond the paper: the four arms at several settings of a policy-gap knob of the world, accuracy
# against the measured expert NLL. gap-sweep: prepare.toy.textbook_frac (moves the model):
# metrics/gap_sweep.json, metrics/plots/gap_sweep.csv (dvc plots), docs/gap_sweep.png.
# gap-sweep-style: prepare.toy.expert_model_style_frac (moves the data, one base model): the same
# files named gap_sweep_style. GAP_SWEEP_ARGS: --values, --seeds, --skip-existing.
GAP_SWEEP_ARGS ?=
.PHONY: gap-sweep gap-sweep-style
gap-sweep: install
	PATH="$(abspath $(VENV))/bin:$$PATH" drsft gap-sweep $(GAP_SWEEP_ARGS)
gap-sweep-style: install
	PATH="$(abspath $(VENV))/bin:$$PATH" drsft gap-sweep --knob expert_model_style_frac $(GAP_SWEEP_ARGS)

# Switch the pipeline to a config overlay (configs/*.yaml: the keys that differ from params.yaml):
# composed over params.yaml, validated, refused when params.yaml has uncommitted changes, then written
# to params.yaml (drsft use). `git checkout params.yaml` goes back.
#   make use CONFIG=configs/qwen2.5-math-7b.yaml && dvc repro
CONFIG ?=
.PHONY: use
use:
	@test -n "$(CONFIG)" || { echo "usage: make use CONFIG=configs/<name>.yaml" >&2; exit 2; }
	@test -x $(PY) || { echo "no $(VENV): run make install first" >&2; exit 2; }
	$(VENV)/bin/drsft use "$(CONFIG)"

bench: install
	$(PY) bench/sample_bench.py
	$(PY) bench/verify_bench.py
	$(PY) bench/train_bench.py

clean-venv:
	rm -rf $(VENV)
