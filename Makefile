# Set-up is two commands: `make run` (install, then run the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint

$(BIN)/nextgpt: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build on disk; the project's range admits it, so nothing else pulls torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/nextgpt

install: $(BIN)/nextgpt

run: install
	$(BIN)/nextgpt generate "Describe this picture, then draw a picture, make a sound and a video of it." \
		--image nextgpt/assets/example.png --want image,audio,video --out $(OUT)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check nextgpt tests benchmarks
	$(BIN)/ruff format --check nextgpt tests benchmarks
