# Every target creates .venv and installs the project when missing, so a fresh
# clone needs nothing but Python 3.11+ and access to the package index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: install demo demo-fast demo-regression test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || rm -rf $(VENV)  # half-made venv: start over
	@test -x $(BIN)/python || $(PYTHON) -c 'import sys; v = sys.version_info; assert (3, 11) <= v[:2] <= (3, 13), "Python 3.11 to 3.13 is needed, found " + sys.version.split()[0]'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "python3 -m venv failed: install your distribution's venv package (e.g. python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rollout demo $(DEMO_ARGS)

demo-fast: $(STAMP)
	$(BIN)/rollout demo --fast $(DEMO_ARGS)

demo-regression: $(STAMP)
	$(BIN)/rollout demo --fast --inject-regression canary $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(TEST_ARGS)

bench: $(STAMP)
	$(BIN)/rollout bench router
	$(BIN)/rollout bench store

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
