# Two entry points for a new user: `make run` (demo job) and `make test` (full suite).
# Both create .venv on first use and install the pinned versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup run test clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

run: setup
	$(BIN)/python -m jobs.sample sample
	$(BIN)/segpipe run --spec jobs/demo.yaml
	$(BIN)/segpipe run --spec jobs/demo-instances.yaml

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf out sample .pytest_cache
