# Developer set-up and the two commands the README opens with: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-cpu

# CPU PyTorch first and pinned: an unpinned `torch` would pull several GB of CUDA wheels.
# The demo needs only the package; the tests add their reference libraries (the test extra).
$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.base
	$(VENV)/bin/rali-edge score rali_edge/assets/samples

test: setup
	$(VENV)/bin/pytest -q

bench-cpu: setup
	$(PY) bench/e2e.py
