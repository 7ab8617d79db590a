# kiln: `make serve` runs the daemon, `make test` runs the whole suite, `make bench` the benchmarks.
# Both install what is missing first (apt packages, the project venv) and build the default image once.
SHELL := /bin/bash
PY := .venv/bin/python
CONFIG ?= $(KILN_CONFIG)

.PHONY: install image serve test unit integration bench clean

install:
	@bash scripts/install-deps.sh

image: install
	@$(PY) -m kiln.cli.main image build $(if $(CONFIG),--config $(CONFIG))

serve: image
	@$(PY) -m kiln.cli.main serve $(if $(CONFIG),--config $(CONFIG))

test:
	@bash scripts/install-deps.sh --test
	@$(PY) -m pytest -ra $(PYTEST_ARGS)

unit:
	@bash scripts/install-deps.sh --test
	@$(PY) -m pytest -ra tests/unit

bench: install
	@$(PY) -m bench.run

clean:
	rm -rf .venv .cache
