# Two entry points for a new user: `make run` (demo job) and `make test` (full suite).
# Both create .venv on first use and install the pinned versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup browser run test clean

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

# Two pytest-xdist workers: a third of a one-process run's wall time is spent waiting on Ray and process
# start-up, which a second worker fills (15:51 -> 11:43 on this 2-core machine). Workers steal
# tests from each other, so the suite's long tests do not leave one worker finishing alone.
test: setup browser
	$(BIN)/python -m pytest -n 2 --dist worksteal

# tests/test_report.py opens reports in headless Chromium: Debian's package, installed when missing
# (as root with apt-get); without it that one test is skipped.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; }; } || \
	  echo "chromium is not installed: the report's browser test will be skipped"

clean:
	rm -rf out sample .pytest_cache
