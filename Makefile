# `make serve` and `make test` work from nothing: they create .venv, install pinned
# dependencies (constraints.txt) and then serve or test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/aserve serve $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/sweep.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
