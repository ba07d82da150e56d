# The two commands: `make run` (the whole pipeline on embedded defaults) and `make test`.
# Each sets up .venv itself from requirements.txt on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench java clean help

help:
	@echo "make run    set up .venv and run every stage locally (generated data, local Delta lake, local MLflow)"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks (see bench/README.md; takes long)"
	@echo "make clean  remove var/ (lake, MLflow store, outputs) and .bench/"

java:
	@command -v java >/dev/null 2>&1 || { echo "Java 17 or newer is required by Spark 4 and was not found on PATH (install e.g. openjdk-17-jre-headless)." >&2; exit 1; }
	@v=$$(java -version 2>&1 | awk -F'"' '/version/ {print $$2; exit}'); major=$${v%%.*}; \
	  [ "$$major" = "1" ] && major=$$(echo $$v | cut -d. -f2); \
	  if [ "$${major:-0}" -lt 17 ] 2>/dev/null; then echo "Java $$v found, but Spark 4 needs Java 17 or newer." >&2; exit 1; fi

$(STAMP): requirements.txt pyproject.toml setup.py
	@test -n "$(PYTHON)" || { echo "Python 3.10+ (3.11 recommended) is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -e '.[local]'
	@touch $(STAMP)

run: java $(STAMP)
	$(BIN)/inboxlift run-all

test: java $(STAMP)
	$(BIN)/python -m pytest -q --durations=20

bench: java $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf var .bench
