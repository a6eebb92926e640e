# FrozenTune developer commands. `make demo` runs the main job, `make test` the tests.
# Everything runs from the project's own .venv and ComfyUI copy, built by `make setup`.

PYTHON ?= python3
PORT ?= 8188
VENV_PY := $(CURDIR)/.venv/bin/python
HARNESS := cd tests && $(VENV_PY)

.PHONY: setup test test-unit test-node test-e2e test-reliability test-browser demo serve lint validate bench gpu-check clean

setup:
	@$(PYTHON) tests/harness/setup_runtime.py

test: setup
	$(HARNESS) -m pytest

test-unit test-node test-e2e test-reliability test-browser: setup
	$(HARNESS) -m pytest -m $(subst test-,,$@)

demo: setup
	$(HARNESS) -m harness.demo

serve: setup
	$(HARNESS) -m harness.serve --port $(PORT)

lint: setup
	$(VENV_PY) -m ruff check .

validate: setup
	.venv/bin/comfy --skip-prompt node validate

bench: setup
	cd tests && for script in ../bench/*_bench.py; do $(VENV_PY) $$script || exit 1; done

gpu-check: setup
	$(HARNESS) ../bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build out .pytest_cache .ruff_cache
