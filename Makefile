# The README's two commands are `make run` and `make test`; both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install install-20newsgroups run test lint

install:
	VENV=$(VENV) bash scripts/install.sh

install-20newsgroups: install
	VENV=$(VENV) bash scripts/install-20newsgroups.sh

# Federated fine-tuning of SmolLM2-135M on Rotten Tomatoes via `flwr run` (Ray simulation).
# Extra launcher flags: make run ARGS='--num-supernodes 6 --run-config "num-server-rounds=5"'
run: install
	$(PY) -m haflq_flower.launch $(ARGS)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .
