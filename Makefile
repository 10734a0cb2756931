# Set-up is two commands: `make run` (install, then run the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False
CHROMIUM ?= /usr/bin/chromium
export NEXTGPT_CHROMIUM := $(CHROMIUM)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test lint

$(BIN)/nextgpt: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build on disk; the project's range admits it, so nothing else pulls torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/nextgpt

install: $(BIN)/nextgpt

# Headless Chromium for the web demo's browser test: Debian's build (Playwright's own download
# needs the network). Skipped once the binary exists; elsewhere, set CHROMIUM=/path/to/chromium.
$(CHROMIUM):
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; \
	else echo "no apt-get: install Chromium and run make with CHROMIUM=/path/to/chromium"; fi

# The main job, on the shipped miniature (nextgpt-mini, the default model): it captions a picture
# of its world, then answers one request with a generated picture, sound and video.
run: install
	$(BIN)/nextgpt generate "What is in the picture?" --image nextgpt/assets/mini-example.png \
		--out $(OUT)/caption
	$(BIN)/nextgpt generate "Please make a picture of a large red circle, a sound of a high buzzy \
	tone pulsing fast and a video of a blue triangle moving left." --out $(OUT)/request

test: install $(CHROMIUM)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check nextgpt tests benchmarks probes
	$(BIN)/ruff format --check nextgpt tests benchmarks probes
