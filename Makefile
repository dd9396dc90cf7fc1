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

# pytest exits 5 when nothing was collected; that is not a failure.
test: install
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

clean:
	rm -rf $(RUN_DIR)
