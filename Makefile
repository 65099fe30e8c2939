# The README's commands. Each target creates .venv if it is missing, installs what
# it needs (CPU torch where there is no NVIDIA GPU) and fetches the default model
# and corpus, so `make demo` and `make test` work on a fresh clone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sqlab-installed
TORCH_CPU := torch==2.13.0

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup fetch demo test lab browser clean-cache

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch; \
	else \
		$(BIN)/python -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,notebooks,eval,ray]"
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/sqlab fetch

fetch: setup

demo: setup
	$(BIN)/sqlab demo

# Debian's Chromium for the browser test (Playwright drives it; no browser is downloaded)
browser:
	command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -qq chromium \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lab: setup
	$(BIN)/jupyter lab notebooks/

clean-cache:
	rm -rf data/cache
