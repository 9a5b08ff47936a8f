# `make serve` and `make test` work from nothing: they create .venv, install pinned
# dependencies (constraints.txt) and then serve or test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve serve-embeddings cluster test bench clean chromium

# deploy/install.sh: the same steps build the container image (deploy/Containerfile).
$(VENV)/.installed: pyproject.toml constraints.txt deploy/install.sh
	PYTHON=$(PYTHON) deploy/install.sh $(VENV) test
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/aserve serve $(ARGS)

# The embedding model (all-MiniLM-L6-v2, from its PyPI wheel) on /v1/embeddings.
serve-embeddings: setup
	$(VENV)/bin/aserve serve --model all-MiniLM-L6-v2 $(ARGS)

# Replicas on loopback behind vllm-router (deploy/cluster.py; Ctrl-C stops them all), e.g.
#   make cluster ARGS="--replicas 3 --policy cache_aware --port 8080 -- --max-num-seqs 64"
cluster: setup
	$(PY) deploy/cluster.py $(ARGS)

# The browser tests drive Debian's chromium (Playwright's own browser download is never used);
# as root, a missing chromium is installed here, elsewhere those tests are skipped with a reason.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: chromium not installed: the browser tests will be skipped"

test: setup chromium
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/sweep.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
