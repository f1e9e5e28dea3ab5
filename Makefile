# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-lane-a test-lane-b lint install browser clean

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
	tests/test_store_faults.py tests/test_security.py

# The tests mostly wait (on subprocesses, servers, Ray), so `make test` runs two lanes at once, each
# its pytest processes in turn (tests/lane.sh). The lanes take about as long as each other: A is the
# main suite without the benchmark smoke runs, then four Ray files; B the benchmark smoke runs
# (tests/test_benchmarks.py), then the other three.
LANE_A := "$(addprefix --ignore=,$(RAY_TESTS) tests/test_benchmarks.py)" tests/test_store_faults.py \
	tests/test_demo.py tests/test_job_submission.py tests/test_security.py
LANE_B := tests/test_benchmarks.py tests/test_pseudolabel.py tests/test_weak.py tests/test_tune.py

# The report's browser tests (tests/browser.py) drive Debian's headless chromium through chromedriver;
# a fresh CI machine lacks both, so `make test` installs them first (as root, else through sudo).
BROWSER_PACKAGES := chromium chromium-driver
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if [ "$$(id -u)" = 0 ] || [ -n "$(SUDO)" ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $(BROWSER_PACKAGES); \
	else \
		echo "make test needs chromium and chromedriver: run 'apt-get install $(BROWSER_PACKAGES)' as root." >&2; \
		exit 1; \
	fi

test: $(STAMP) lint browser
	$(BIN)/medclipsam data samples  # once, before the lanes would both fetch it
	$(MAKE) --no-print-directory -j2 test-lane-a test-lane-b

test-lane-a: $(STAMP)
	tests/lane.sh $(BIN)/python a $(LANE_A)

test-lane-b: $(STAMP)
	tests/lane.sh $(BIN)/python b $(LANE_B)

clean:
	rm -rf $(VENV) demo_output
