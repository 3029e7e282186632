# Two commands: `make demo` and `make test`. Both set up .venv first (reused on repeat runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test figures clean

install: $(STAMP)

# torch is pinned first so pip takes the local CPU build instead of pulling CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4,<3"
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

demo: install
	$(PY) -m lens_halluc.demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
