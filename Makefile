# The two commands of the README: `make train` and `make test`.
# TORCH is installed first so pip never pulls a multi-GB CUDA build on CPU machines;
# on GPU machines override it, e.g. `make train TORCH=torch==2.8.0`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data/digits
RUN_DIR ?= runs/tiny-neuclip
NPROC ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=

# DeepSpeed's JIT ops are built into the venv (see neuclip_ds/extensions.py), never into a cache that venvs share.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lint test test-transformers4 train data clean openclip-venv

$(STAMP): pyproject.toml requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m neuclip_ds.extensions
	@touch $(STAMP)

install: $(STAMP)

# The embedded default data set (real digits from scikit-learn, rendered with attributes); a no-op once built.
data: install
	$(PY) -m neuclip_ds.data.embedded --out $(DATA_DIR)

# The embedded default run: tiny preset, NeuCLIP, ZeRO-2 on $(NPROC) CPU ranks, then evaluation.
# Re-running resumes an interrupted run (--resume auto); `make clean` starts over.
train: data
	launchers/single_node.sh $(NPROC) --config configs/tiny-neuclip.yaml --dataset-dir $(DATA_DIR) \
		--output-dir $(RUN_DIR) --resume auto $(TRAIN_ARGS)

# ruff's lint and format rules live in pyproject.toml; `ruff format .` fixes what the format check finds.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest exits 5 when nothing was collected; that is not a failure.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# An exported model loaded by transformers 4.x users (the venv has 5.x): the oldest release requirements.txt allows
# and the last 4.x, each with its tokenizers, installed beside the venv and used only by the round-trip script that
# tests/test_export.py runs in a process of its own. A CI step of its own (.ci/run).
define roundtrip_under
	test -f $(VENV)/transformers-$(1)/.installed || { $(PY) -m pip install -q --no-deps \
		--target $(VENV)/transformers-$(1) "transformers==$(1)" "tokenizers$(2)" "huggingface_hub>=0.34,<1.0" \
		&& touch $(VENV)/transformers-$(1)/.installed; }
	NEUCLIP_TRANSFORMERS_PATH=$(CURDIR)/$(VENV)/transformers-$(1) $(PY) -m pytest -q tests/test_export.py -k user_gets
endef

test-transformers4: install
	$(call roundtrip_under,4.45.2,~=0.20.0)
	$(call roundtrip_under,4.57.6,==0.22.*)

clean:
	rm -rf $(RUN_DIR)

# Only for benchmarks/vs_openclip.py: OpenCLIP's trainer needs torchvision, which does not import beside the core
# venv's CPU torch wheel, so it gets its own venv with a matching torch/torchvision pair (and neuclip_ds itself,
# so both trainers run on the same torch).
OPENCLIP_VENV := .venv-openclip
OPENCLIP_TORCH ?= torch==2.14.1 torchvision==0.29.1
openclip-venv: $(OPENCLIP_VENV)/.installed
$(OPENCLIP_VENV)/.installed: pyproject.toml requirements.txt
	@test -x $(OPENCLIP_VENV)/bin/python || $(PYTHON) -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/python -m pip install -q $(OPENCLIP_TORCH)
	$(OPENCLIP_VENV)/bin/python -m pip install -q "open_clip_torch[training]==2.26.1" -e .
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(OPENCLIP_VENV)/torch_extensions $(OPENCLIP_VENV)/bin/python -m neuclip_ds.extensions
	@touch $@
