# `make demo` and `make test` work on a fresh clone: the venv is built on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test benchmark gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m train_pytorch_model.demo

test: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

benchmark: venv
	$(PY) benchmarks/benchmark_training.py

gpu-check: venv
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) demo_output benchmark_output mlflow.db mlruns out
