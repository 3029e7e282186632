# Two commands: `make demo` and `make test`. Both set up .venv first (reused on repeat runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test figures clean browser

install: $(STAMP) browser

# torch is pinned first so pip takes the local CPU build instead of pulling CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4,<3"
	$(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

# Static PNG figures: kaleido renders with a local Chromium (Debian's package; nothing is fetched at run time).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null); } || \
	  echo "warning: no Chromium found or installable; PNG figures will be skipped (HTML still written)"

# The main job on the embedded default: attribute the organism's hallucinations to heads.
demo: install
	$(PY) -m lens_halluc.attribute --out runs/demo

# Regenerate every figure in figures/ from scratch on the shipped organism.
figures: install
	$(PY) analyses/attribution_heads.py
	$(PY) analyses/atp_agreement.py
	$(PY) analyses/bias.py
	$(PY) analyses/inheritance.py
	$(PY) analyses/drift.py
	$(PY) analyses/confounders.py
	$(PY) analyses/reweighting.py
	$(PY) analyses/retrain.py
	$(PY) analyses/interventions.py
	$(PY) analyses/summary.py

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
