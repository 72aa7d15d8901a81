# The two commands a newcomer needs. Both create .venv on first use.
#   make demo   run the main job (configs/local.yaml: the shipped demo model on the sample manifest)
#   make test   run the test suite
VENV ?= .venv
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: setup demo test lint bench
# One line per step; pip's output goes to $(VENV)/setup.log (printed in part when a step fails).
setup:
	@EVF_VENV=$(VENV) bash scripts/setup-env.sh

demo: setup
	$(VENV)/bin/evf run configs/local.yaml

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check evf cli pipelines training tests benchmarks scripts
	$(VENV)/bin/ruff format --check evf cli pipelines training tests benchmarks scripts
