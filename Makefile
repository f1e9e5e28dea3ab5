# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-lane-a test-lane-b lint install system-tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medclipsam data samples
	$(BIN)/medclipsam demo --output demo_output

lint: $(STAMP)
	$(BIN)/ruff check platform tests jobs benchmarks
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# Tests that start Ray clusters get a process each: a second cluster, or the session's Ray reused
# after Ray Train, left the in-process instance hung in one full-suite run.
RAY_TESTS := tests/test_pseudolabel.py tests/test_weak.py tests/test_tune.py tests/test_job_submission.py tests/test_demo.py \
	tests/test_store_faults.py tests/test_security.py tests/test_node_loss.py tests/test_head_loss.py

# The tests mostly wait (on subprocesses, servers, Ray), so `make test` runs two lanes at once, each
# its pytest processes in turn (tests/lane.sh). The lanes take about as long as each other: A is the
# main suite without the benchmark smoke runs, then four Ray files; B the benchmark smoke runs
# (tests/test_benchmarks.py), then the other five.
LANE_A := "$(addprefix --ignore=,$(RAY_TESTS) tests/test_benchmarks.py)" tests/test_store_faults.py \
	tests/test_demo.py tests/test_job_submission.py tests/test_security.py
LANE_B := tests/test_benchmarks.py tests/test_pseudolabel.py tests/test_weak.py tests/test_tune.py tests/test_node_loss.py \
	tests/test_head_loss.py

# Programs the tests drive that PyPI does not ship: Debian's headless chromium and its chromedriver
# (the report's browser tests, tests/browser.py) and dicom3tools' dciodvfy, the DICOM standard's own
# validator (the SEG tests). A fresh CI machine lacks them, so `make test` installs the missing ones
# first (as root, else through sudo).
SYSTEM_TOOLS := chromium:chromium chromedriver:chromium-driver dciodvfy:dicom3tools
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))

system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] || [ -n "$(SUDO)" ]; then \
		echo "installing$$missing (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	else \
		echo "make test needs$$missing: run 'apt-get install$$missing' as root." >&2; \
		exit 1; \
	fi

test: $(STAMP) lint system-tools
	$(BIN)/medclipsam data samples  # once, before the lanes would both fetch it
	rm -rf build/lanes && mkdir -p build/lanes
	LANE_FAILURES=build/lanes $(MAKE) --no-print-directory -j2 -k test-lane-a test-lane-b \
		|| { echo "make test failed; the failures of both lanes:"; cat build/lanes/*.txt; exit 1; }

test-lane-a: $(STAMP)
	tests/lane.sh $(BIN)/python a $(LANE_A)

test-lane-b: $(STAMP)
	tests/lane.sh $(BIN)/python b $(LANE_B)

clean:
	rm -rf $(VENV) demo_output
