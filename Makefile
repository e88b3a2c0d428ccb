# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint schema clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The core (with the lab) and the two plugin distributions, each editable: clipguard-cbpt
# (plugins/cbpt) and clipguard-baselines (plugins/baselines) provide every scanner and purifier.
PLUGINS := plugins/cbpt plugins/baselines

# torch 2.14.1 / torchvision 0.29.1 are installed from the machine's local wheel cache by pip;
# the ray extra (fleet scans on Ray, docs/fleet.md) so that its tests run too.
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) | $(PY)
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e ".[dev,ray]" $(addprefix -e ,$(PLUGINS))
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check clipguard plugins tests benchmarks
	$(VENV)/bin/ruff format --check clipguard plugins tests benchmarks

schema: install
	$(VENV)/bin/clipguard schema --write

demo: install
	$(VENV)/bin/clipguard demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
