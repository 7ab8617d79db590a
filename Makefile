# kiln: `make serve` runs the daemon, `make test` runs the whole suite, `make bench` the benchmarks.
# Both install what is missing first (apt packages, the project venv). The built-in images are built
# once per machine into /var/cache/kiln/images (keyed by recipe): `make serve` starts the daemon at
# once and it builds missing images in the background; `make test` builds them before the suite.
# `make test` runs ruff and mypy before the suite; `make unit` only the fast unit tests.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= $(KILN_CONFIG)

.PHONY: install image serve lint test unit integration bench clean

install:
	@bash scripts/install-deps.sh

image: install
	@$(PY) -m kiln.cli.main image prepare $(if $(CONFIG),--config $(CONFIG))

serve: install
	@$(PY) -m kiln.cli.main serve $(if $(CONFIG),--config $(CONFIG))

# Lint and types first: a finding fails the run before any sandbox starts.
lint:
	@.venv/bin/ruff format --check kiln tests bench
	@.venv/bin/ruff check kiln tests bench
	@.venv/bin/mypy

test:
	@bash scripts/install-deps.sh --test
	@$(MAKE) --no-print-directory lint
	@$(PY) -m kiln.cli.main image prepare
	@$(PY) -m pytest -ra $(PYTEST_ARGS)

# Only the fast tests of pure logic: installs the Python packages, no system package, no root needed.
unit:
	@bash scripts/install-deps.sh --python-only
	@$(PY) -m pytest -ra tests/unit

bench: install
	@$(PY) -m bench.run

clean:
	rm -rf .venv .cache
