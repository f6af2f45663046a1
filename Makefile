# The two commands a newcomer needs (see README): `make serve` and `make test`.
# Each creates its own virtual environment on first use and reinstalls when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint system-tools
# A recipe that fails half-way (`python -m venv` without ensurepip leaves .venv/bin/python behind)
# must not leave a target that the next run takes for done.
.DELETE_ON_ERROR:

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "dynface needs Python >= 3.11 ($(PYTHON) is missing or older): run make PYTHON=python3.11 (or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[worker]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[worker,test]'
	touch $@

serve: $(VENV)/.installed-runtime
	$(BIN)/dynface serve $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# Debian's Chromium (tests/web) and promtool (tests/ops); a no-op once installed.
system-tools:
	scripts/setup-system-tools

test: lint system-tools
	scripts/run-tests $(BIN)
