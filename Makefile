# Two commands do all set-up on a fresh machine:
#   make demo   - the main job (creates .venv if needed, then runs `vidsparse demo`)
#   make test   - the test suite (creates .venv if needed, then runs pytest)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: demo test venv clean

venv: $(STAMP)

# Re-install only when the requirements or the package metadata change.
$(STAMP): requirements-ci.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vidsparse demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
