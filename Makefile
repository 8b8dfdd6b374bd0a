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

CHROMIUM ?= /usr/bin/chromium

.PHONY: setup lab test clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[lab,service,test,gpu,dask]"
	@touch $(STAMP)

# JupyterLab at the repository root (its file browser reaches data/ and notebooks/), opened on the tour.
# The notebooks are trusted first: `jupyter trust` signs them in your Jupyter data folder, so their saved
# outputs (HTML, widgets) show as saved. scripts/execute_notebook.py saves them in the form JupyterLab
# writes, so they open unmodified.
LAB_NOTEBOOK ?= notebooks/00_tour.ipynb

lab: setup
	@echo "trusting notebooks/[0-9]*.ipynb (jupyter trust)"
	@$(VENV)/bin/jupyter trust notebooks/[0-9]*.ipynb >/dev/null
	$(VENV)/bin/jupyter lab --no-browser --ip=127.0.0.1 --ServerApp.root_dir=. \
	  --LabApp.default_url=/lab/tree/$(LAB_NOTEBOOK) $(if $(filter 0,$(shell id -u)),--allow-root,)

# Debian's Chromium for tests/test_browser.py: installed when missing and we are root;
# otherwise that test is skipped and says why. Never a browser download of its own.
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "WARNING: could not install chromium; tests/test_browser.py will be skipped"; \
	else echo "WARNING: $(CHROMIUM) missing and not root (or no apt-get); tests/test_browser.py will be skipped"; fi

test: setup browser
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
