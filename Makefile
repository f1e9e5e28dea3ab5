# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

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

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(addprefix --ignore=,$(RAY_TESTS))
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_pseudolabel.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_weak.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_tune.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_job_submission.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_demo.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_store_faults.py
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_security.py

clean:
	rm -rf $(VENV) demo_output
