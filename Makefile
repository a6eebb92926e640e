# FrozenTune developer commands. `make demo` runs the main job, `make test` the tests.
# Everything runs from the project's own .venv and ComfyUI copy, built by `make setup`.

PYTHON ?= python3
PORT ?= 8188
VENV_PY := $(CURDIR)/.venv/bin/python
HARNESS := cd tests && $(VENV_PY)

.PHONY: setup test test-quick test-all test-long test-unit test-node test-e2e test-reliability test-browser demo thumbnails serve lint validate bench gpu-check gpu-check-venv gpu-check-offline gpu-bundle clean

setup:
	@$(PYTHON) tests/harness/setup_runtime.py

# `make test` (and CI) leaves out the `long` tests (reliability fuzz and soak, the whole gpu-check CPU dry run,
# repeats of a case in another dtype or family); `make test-long` runs only those, `make test-reliability` the
# whole reliability group, `make test-all` everything. Each prints its 25 slowest tests, so a CI log shows where
# the time goes; `make test` and `make test-quick` also print their wall time.
DURATIONS := --durations=25
# runs a command, then prints how long it took (pass or fail) and exits with its status
TIMED = start=$$(date +%s); $(1); rc=$$?; echo "make $@: $$(( $$(date +%s) - start )) s"; exit $$rc

test: setup
	$(call TIMED,$(HARNESS) -m pytest -m "not long" $(DURATIONS))

# for iteration: unit and node tests in fp32, no server, no `half`, `slow` or `long` test (~4 min on 2 idle cores)
test-quick: setup
	$(call TIMED,$(HARNESS) -m pytest -m "(unit or node) and not half and not slow and not long" $(DURATIONS))

test-all: setup
	$(HARNESS) -m pytest $(DURATIONS)

test-long: setup
	$(HARNESS) -m pytest -m long $(DURATIONS)

test-unit test-node test-e2e test-browser: setup
	$(HARNESS) -m pytest -m $(subst test-,,$@) $(DURATIONS)

# the whole reliability group, its fuzz and soak included
test-reliability: setup
	$(HARNESS) -m pytest -m reliability $(DURATIONS)

demo: setup
	$(HARNESS) -m harness.demo

# the Templates-menu thumbnails (workflows/<name>.jpg): the graph captured in the real page, for the missing and
# stale ones (a node test fails on those); THUMBNAILS_ARGS="--all" captures every one
thumbnails: setup
	cd tests && PYTHONPATH=. $(VENV_PY) -m harness.thumbnails --write $(THUMBNAILS_ARGS)

serve: setup
	$(HARNESS) -m harness.serve --port $(PORT)

lint: setup
	$(VENV_PY) -m ruff check .

validate: setup
	.venv/bin/comfy --skip-prompt node validate

bench: setup
	cd tests && for script in ../bench/*_bench.py; do $(VENV_PY) $$script || exit 1; done

# `make gpu-check` runs from the project's venv when there is one (developers), else from the offline bundle
# (a lent GPU machine: no registry, its own python3 and CUDA torch, build/gpu_bundle carried; see
# CONTRIBUTING.md). GPU_CHECK_FROM=venv|bundle forces one. `make gpu-bundle` builds the bundle, here.
GPU_CHECK_FROM ?= $(if $(wildcard .venv/bin/python),venv,$(if $(wildcard build/gpu_bundle/manifest.json),bundle,venv))

gpu-check: gpu-check-$(if $(filter bundle,$(GPU_CHECK_FROM)),offline,venv)

gpu-check-venv: setup
	$(HARNESS) ../bench/gpu_check.py $(GPU_CHECK_ARGS)

# never runs `setup`: the machine's python3 and torch, the bundle's wheels installed --no-index into $$FT_SITE
gpu-check-offline:
	sh bench/run_gpu_check_offline.sh $(GPU_CHECK_ARGS)

gpu-bundle:
	@$(PYTHON) tests/harness/gpu_bundle.py

clean:
	rm -rf build out .pytest_cache .ruff_cache
