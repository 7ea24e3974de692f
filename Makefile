# tbd_ops — the two everyday commands:
#   make test    build everything, run pytest, the GoogleTest suite and the CPU kernels under ASan
#   make bench   build, run the kernel microbenchmarks on the best device present
# Set-up is automatic: a virtual environment in .venv with torch==2.11.0.
# On a machine that already has torch and no network (e.g. a GPU box), use
#   make gpu-suite            (uses the system python3, creates nothing, downloads nothing)
# Knobs: TBD_OPS_CUDA=0|1, TBD_OPS_CUDA_ARCHS="80;90", MAX_JOBS, PYTHON, TORCH_SPEC, TORCHVISION_SPEC.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.11.0
TORCHVISION_SPEC ?= torchvision==0.26.0
DEV_DEPS    ?= numpy pytest hypothesis expecttest matplotlib ninja setuptools wheel \
               mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.1.0
BUILD_DIR   ?= build/cpp
MAX_JOBS    ?= 2
export MAX_JOBS
# CUDA architectures of make's builds (and what the tests expect): the local GPU's, else sm_90 (CI's).
# `pip install .` keeps setup.py's full default list.
ifeq ($(origin TBD_OPS_CUDA_ARCHS),undefined)
TBD_OPS_CUDA_ARCHS := $(or $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. '),90)
endif
export TBD_OPS_CUDA_ARCHS

ifeq ($(USE_SYSTEM_PYTHON),1)
PY := $(PYTHON)
DEPS :=
else
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-stamp
endif

.PHONY: all build build-emu test pytest pytest-asan ctest ctest-asan bench gpu-suite cuda-report clean

all: build

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)" $(DEV_DEPS)
	touch $@

# Compiles the extension in place (python/tbd_ops/_C*.so); incremental with ninja.
# Users install with:  pip install --no-build-isolation .
build: $(DEPS)
	$(PY) setup.py --quiet build_ext --inplace

# Test-only: the CUDA path (glue, launchers, kernels) compiled by the host
# compiler against the SIMT emulator (tests/emu/tbd_ops_emu*.so, never installed).
build-emu: $(DEPS)
	$(PY) tests/emu/setup.py

pytest: build build-emu
	$(PY) -m pytest tests -q

# The CPU kernels under AddressSanitizer + UBSan: a CPU-only build in $(ASAN_DIR) (beside a copy of the
# Python package), and the op tests on the cpu device with the sanitizer runtime preloaded into Python.
# An out-of-bounds access then fails the test run with a report instead of corrupting memory.
ASAN_DIR   ?= build/asan
# The op tests (one file per op family, named after python/tbd_ops/ops/<op>.py) and the loss modules'.
ASAN_TESTS ?= $(sort $(foreach f,$(wildcard python/tbd_ops/ops/[a-z]*.py),$(wildcard tests/test_$(notdir $(f)))) \
                     tests/test_nn_tbd.py tests/test_nn_pseco.py)
ASAN_SELECT ?=
pytest-asan: $(DEPS)
	rm -rf $(ASAN_DIR)/lib/tbd_ops && mkdir -p $(ASAN_DIR)/lib
	cp -r python/tbd_ops $(ASAN_DIR)/lib/ && rm -f $(ASAN_DIR)/lib/tbd_ops/_C*.so
	TBD_OPS_CUDA=0 TBD_OPS_ASAN=1 $(PY) setup.py --quiet build_ext --build-lib $(ASAN_DIR)/lib --build-temp $(ASAN_DIR)/temp
	@# libstdc++ preloaded too: ASan intercepts C++ exceptions only if it is loaded at start-up. The
	@# reports go to files (pytest's capture would lose them when the sanitizer ends the process).
	rm -f $(ASAN_DIR)/report.*
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:log_path=$(ASAN_DIR)/report \
	  UBSAN_OPTIONS=print_stacktrace=1:log_path=$(ASAN_DIR)/report TBD_OPS_TEST_PACKAGE=$(ASAN_DIR)/lib \
	  $(PY) -m pytest $(ASAN_TESTS) -q -p no:cacheprovider -m "not cuda_emu and not requires_emu and not cuda" \
	  -k "$(ASAN_SELECT)" || { cat $(ASAN_DIR)/report.* 2>/dev/null; exit 1; }

ctest:
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(BUILD_DIR)
	@ctest --test-dir $(BUILD_DIR) --output-on-failure > $(BUILD_DIR)/ctest.log 2>&1; rc=$$?; \
	if [ $$rc -ne 0 ]; then cat $(BUILD_DIR)/ctest.log; else tail -n 3 $(BUILD_DIR)/ctest.log; fi; exit $$rc

# Runs both suites even if the first fails; fails if either failed.
test: build build-emu
	@status=0; \
	echo "==== pytest ===="; \
	$(PY) -m pytest tests -q -ra || status=1; \
	echo "==== GoogleTest (ctest) ===="; \
	$(MAKE) --no-print-directory ctest || status=1; \
	echo "==== the CPU kernels under AddressSanitizer (pytest-asan) ===="; \
	$(MAKE) --no-print-directory pytest-asan || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED"; else echo "make test: all passed"; fi; \
	exit $$status

bench: build
	PYTHONPATH=python $(PY) benchmarks/run_all.py

gpu-suite:
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build python/tbd_ops/_C*.so tests/emu/tbd_ops_emu*.so

# Registers, shared memory, spills and theoretical H100 occupancy of every kernel (sm_90; no GPU needed).
cuda-report:
	$(PYTHON) benchmarks/cuda_report.py
