# Two commands for a fresh machine:
#   make demo   sets up .venv and trains the full Hydra recipe on the embedded synthetic task
#   make test   sets up .venv and runs the test suite
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints/cpu.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast lint

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# constraints/cpu.txt pins the CPU build of torch on CPU machines (see README, "Installing").
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e '.[dev,text]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/hydra-kit fit --config recipes/full.yaml

test: setup
	$(VENV)/bin/pytest -q

# The inner loop: everything but the tests marked slow (subprocesses, training runs); CI runs `make test`.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check hydra_kit components tests
	$(VENV)/bin/mypy
