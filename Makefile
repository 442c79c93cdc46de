# `make study`: set up .venv if needed, then run the whole DVC pipeline (dvc repro).
# `make test`:  set up .venv if needed, then run the whole test suite (as CI does).
# `make test-fast`: the same without the slow tests (DVC end to end, kill-and-resume).
# `make test-avx2`: the whole suite with PyTorch's, oneDNN's and MKL's AVX2 kernels forced, as a
#   CPU without AVX-512 runs it (float rounding differs between the two; tolerances must hold on both).
# `make paper`: the paper's regime on a CUDA GPU as one DVC experiment (presets/paper.yaml).
# `make bench`: speed benchmarks (bench/run.py), results in bench/results.md.
# `make readme`: copy the generated results (iqals/readme.py, BLOCKS) into README.md.
# `make clean`: delete what `make study` rebuilds; committed results (logs/, metrics/, plots/) stay.
# `make parallel WORKERS=2`: the out-of-date stages side by side on Dask (stages/parallel.py);
#   SCHEDULER=tcp://host:8786 uses a running Dask cluster instead of a local one.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here, not in pyproject: on the project's machines only this build ships a
# torchvision that loads (see README, "Environment"). Override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Use the local CIFAR-10 copy beside the checkout when there is one (README, "Data").
CIFAR10_LOCAL ?= $(wildcard $(abspath ../shared/data/cifar10))
export CIFAR10_LOCAL
export PATH := $(abspath $(VENV))/bin:$(PATH)

WORKERS ?= 2
SCHEDULER ?=
# The suite's test files side by side, one per core (pytest-xdist, at most 4 workers): each file on
# one worker, so a module's fixture (a whole tiny DVC pipeline) is built once.
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

.PHONY: setup study paper test test-fast test-avx2 bench readme parallel clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

study: setup
	dvc repro

paper: setup
	$(PY) -m stages.preset presets/paper.yaml

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(PYTEST)

bench: setup
	$(PY) -m bench.run

readme: setup
	$(PY) -m iqals.readme

parallel: setup
	$(PY) -m stages.parallel --workers $(WORKERS) $(if $(SCHEDULER),--scheduler $(SCHEDULER))

clean:
	rm -rf data models checkpoints bench/out
