# glasses-relay: the two commands a user needs are `make run` and `make test`.
# Both create .venv when it is missing and install what they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_TOOLS := mosquitto tshark redis-server
SYSTEM_PACKAGES := mosquitto tshark redis-server
FUZZ_SECONDS ?= 600
SOAK_ARGS ?=

.PHONY: run test lint typecheck pytest fuzz soak system-tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed-run

# The whole path on this machine: emulated glasses, the daemon and a local
# gateway, a user's day for 60 s, then a summary.
run: $(VENV)/.installed-run
	$(BIN)/glasses-relay demo

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || [ -x /usr/sbin/$$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system tools:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "missing system tools:$$missing; install the Debian packages: $(SYSTEM_PACKAGES)" >&2; exit 1; \
	  fi; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: $(VENV)/.installed-test system-tools
	$(BIN)/python -m pytest -q --durations=15

test: lint typecheck pytest

# 1,000,000 plain inputs through the frame and handshake receive paths, then
# coverage-guided atheris on each target for FUZZ_SECONDS.
fuzz: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e ".[fuzz]"
	$(BIN)/python tests/fuzz/fuzz_transport.py --random 1000000
	$(BIN)/python -m tools.fuzz --target session --plain 1000000
	$(BIN)/python -m tools.fuzz --target protocol --seconds $(FUZZ_SECONDS)
	$(BIN)/python -m tools.fuzz --target session --seconds $(FUZZ_SECONDS)
	$(BIN)/python tests/fuzz/fuzz_transport.py -max_total_time=$(FUZZ_SECONDS)

soak: $(VENV)/.installed-test system-tools
	$(BIN)/python -m pytest -q -m soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
