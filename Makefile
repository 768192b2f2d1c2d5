# `make demo` and `make test` work on a fresh clone: the venv is built on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AZUREML_SERVING := azureml-inference-server-http==1.5.1 azure-monitor-opentelemetry==1.6.7

.PHONY: venv demo test test-fast benchmark wheelhouse gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The Azure ML inference server pins its own OpenTelemetry and pydantic: a folder of its own, put first on
	# PYTHONPATH only when it runs (tests/test_azureml_serving.py), as Azure ML's image keeps it apart.
	$(PY) -m pip install --quiet --no-warn-conflicts --target $(VENV)/azureml-serving $(AZUREML_SERVING)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m train_pytorch_model.demo

# Everything, as CI runs it.
test: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

# The inner loop: everything but the tests marked slow (subprocesses, torchrun, servers, the demo, benchmarks).
test-fast: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -m "not slow"

benchmark: venv
	$(PY) benchmarks/benchmark_training.py

# On a networked machine: .whl/, the wheels an offline GPU host lacks (never torch; docs/performance.md).
wheelhouse: venv
	$(PY) benchmarks/wheelhouse.py --out .whl

# On the GPU host, offline: its own python3 + torch, the wheels in .whl/; results in gpu_check_output/.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) demo_output benchmark_output gpu_check_output .whl mlflow.db mlruns out
