# Two entry points that work on a fresh machine: `make train` (the CPU demo) and `make test` (the test suite).
# Both create .venv on first use. torch is installed first and pinned, so the CPU build on local disk is used and
# no resolver pulls a CUDA build into a CPU environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup train test device-bundle clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The staged CPU demo: 2 processes, seq 256 (DP2) then seq 1024 (TP2), checkpoints and resume; run again, it
# says the run is complete (delete runs/tiny_cpu_staged to start over).
train: setup
	$(VENV)/bin/mimo-train train --config configs/train/tiny_cpu_staged.yaml --nproc 2

test: setup
	$(PY) -m pytest -q

# What a GPU machine with only Python 3.12 and torch needs for bench/gpu/device_run.sh (PyYAML, pytest and its
# dependencies, unpacked, < 10 MiB): build/device_bundle/site, to be carried (README: "First GPU run").
device-bundle: setup
	$(PY) -m bench.gpu.bundle build/device_bundle

clean:
	rm -rf runs .cache
