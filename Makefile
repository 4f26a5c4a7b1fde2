# Two entry points, each self-contained on a fresh machine:
#   make demo   set up a virtual environment and run the demo on a built-in default
#   make test   set up a virtual environment and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test,demo,gpu]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collects no test: that is not a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/prune demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
