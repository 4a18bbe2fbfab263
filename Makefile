# make run: set up .venv, build the extension, check every backend against the reference, bench.
# make test: the same set-up, then pytest and the C++ tests (ctest).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
# The conventional toolkit root: nvcc on PATH may be a wrapper that hides it. Without a toolkit
# there, setup.py and CMake skip the CUDA kernels and say so.
export CUDA_HOME ?= /usr/local/cuda

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.txt' -o -name '*.cmake') \
           setup.py pyproject.toml

.PHONY: setup run test verify bench ctest clean

setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

run: setup
	$(PY) -m mgpp_kernels verify
	$(PY) -m mgpp_kernels bench --quick

test: setup
	$(PY) -m pytest -q
	$(MAKE) ctest

ctest: setup
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

verify: setup
	$(PY) -m mgpp_kernels verify

bench: setup
	$(PY) -m mgpp_kernels bench

clean:
	rm -rf build mgpp_kernels/*.so $(VENV)/.built
