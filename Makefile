# make test / make demo work from a clean clone: each creates .venv when missing and installs
# lowrank editable with its test extras. With no torch in the venv we install the CPU build
# torch==2.13.0 first (a plain `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowrank-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench native clean

install: $(STAMP)

$(STAMP): setup.py csrc/lowrank.h csrc/merge_math.h csrc/merge_cpu.cpp csrc/nf4_cpu.cpp csrc/dora_cpu.cpp csrc/merge_cuda.cu
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/lowrank compare

bench: install
	$(PY) -m bench.run --quick

native:
	$(PY) setup.py build_native

clean:
	rm -rf $(VENV) build lowrank/_lib *.egg-info .pytest_cache .hypothesis
