# Both targets create .venv on first use and install netcleanse into it (editable),
# so `.venv/bin/netcleanse` exists afterwards. Ray and Keras 3 + JAX (optional extras) are installed
# too, so that the tests of --executor ray and the checks against Keras's own outputs run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow setup clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,ray,keras-reference]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/netcleanse demo --out demo-out --force

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

clean:
	rm -rf $(VENV) demo-out
