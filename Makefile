# Two commands: `make demo` and `make test`. Both create .venv when missing and install the
# pinned set once; a second run installs nothing unless requirements.txt or pyproject.toml changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-full demo-reasoning test docs dist install browser clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium drives the report and study browser tests (Playwright uses it, never a
# downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The tiny demo model's matrices are too small to split across threads; one thread per process
# also keeps it from thrashing when other jobs share the cores. Override: make demo OMP_NUM_THREADS=4
OMP_NUM_THREADS ?= 1
demo: $(STAMP)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(BIN)/vlmtune demo

demo-full: $(STAMP)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(BIN)/vlmtune demo --full

demo-reasoning: $(STAMP)
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) $(BIN)/vlmtune demo --task reasoning

# The docs site (docs/_build/site): pages staged from README, docs/, the real --help and the
# docstrings, built with warnings as errors so a broken reference fails `make test` too.
docs: $(STAMP)
	$(BIN)/python scripts/gen_docs.py
	$(BIN)/mkdocs build --strict --quiet
	@echo "docs site: docs/_build/site/index.html"

# The sdist and the wheel in dist/, built with the pinned setuptools (no download).
dist: $(STAMP)
	$(BIN)/python -m build --no-isolation --outdir dist .

test: $(STAMP) browser docs
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs demo-out demo-reasoning docs/_build dist build
