# Two commands for a user: `make lab` and `make test`. Both set up .venv first.
# Setup is idempotent: it reinstalls only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build from the local wheel cache; an unpinned `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.mlbench-installed

# glibc malloc makes large CPU forwards 2-2.5x slower; this must be set before Python starts.
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export PYTHONHASHSEED := 0

.PHONY: setup lab test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[lab,service,test,gpu]"
	@touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
