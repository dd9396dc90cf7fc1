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

export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test train data clean

$(STAMP): pyproject.toml requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
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

# pytest exits 5 when nothing was collected; that is not a failure.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

clean:
	rm -rf $(RUN_DIR)
