# Everything runs from a project-local virtual environment, created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

$(PY): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(PY)

.PHONY: venv run test test-slow test-all lint bench
venv: $(PY)

## The main job: train the PSF field model on its embedded star field, on all local devices
## (8 simulated devices on a CPU-only machine).
run: $(PY)
	$(PY) -m distributed.train --workdir=runs/default $(if $(shell $(PY) -c "import jax; print(jax.default_backend())" 2>/dev/null | grep -x cpu),--host_devices=8,) $(ARGS)

## The test suite (8 simulated CPU devices); slow end-to-end tests run with `make test-slow`.
test: $(PY)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

## Multi-process, real SLURM, crash/resume and main-job tests.
test-slow: $(PY)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(PY)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(PY)
	$(PY) -m ruff check distributed tests benchmarks launch

bench: $(PY)
	for b in step_overhead vs_seed_loop data checkpoint scaling transformer vs_peers; do \
		$(PY) benchmarks/$$b.py --devices=8 || exit 1; done
