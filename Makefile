# On a fresh machine `make demo` or `make test` is all it takes: the first run creates .venv and
# installs kvlab with its test extras; later runs reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvlab-installed

.PHONY: env demo test lint clean

env: $(STAMP)

# torch first, pinned: its CPU wheel is what pip picks here; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@

demo: $(STAMP)
	$(PY) -m kvlab.demo

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf out build dist *.egg-info
