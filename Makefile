# Developer set-up and the two commands the README opens with: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench-cpu

# The package is installed as users get it (a wheel, not an editable install) and again whenever
# its sources change, so that the tests run what a user would run.
SOURCES := pyproject.toml $(shell find rali_edge/ engines/ kernels/ -type f -not -name '*.pyc' 2>/dev/null)

# CPU PyTorch first and pinned: an unpinned `torch` would pull several GB of CUDA wheels.
$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	touch $@

# The demo needs only the package; the tests add their reference libraries (the test extra).
$(VENV)/.base: $(VENV)/.torch $(SOURCES)
	$(PY) -m pip install -q .
	touch $@

$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(PY) -m pip install -q '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.base
	$(VENV)/bin/rali-edge score rali_edge/assets/samples

# The full suite (CI runs it). test-fast leaves out the tests marked slow (builds, training runs,
# Ray clusters): every module still runs, in about 4 minutes on 2 cores.
test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench-cpu: setup
	$(PY) bench/e2e.py
