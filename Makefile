# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need; torch==2.13.0 is the CPU wheel.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint

$(BIN)/peftgen: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	for p in plugins/*/; do if [ -f "$$p/pyproject.toml" ]; then $(BIN)/pip install -q -e "$$p"; fi; done
	touch $@

install: $(BIN)/peftgen

test: install
	$(BIN)/python -m pytest -q tests $(wildcard plugins/*/tests)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: install
	$(BIN)/python -m peftgen.demo
