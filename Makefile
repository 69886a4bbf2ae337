# Two commands on a fresh machine: `make demo` (the main job: the web demo) and `make test`.
# Each creates .venv at the repository root and installs into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together here (open-clip needs torchvision).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo compare test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -P -m vlmcompress.demo.app $(ARGS)

compare: $(STAMP)
	$(PY) -P -m vlmcompress.demo $(ARGS)

test: $(STAMP)
	$(PY) -P -m pytest -q -n 2 $(ARGS)

bench: $(STAMP)
	$(PY) -P benchmarks/ops.py
	$(PY) -P benchmarks/kernels.py
	$(PY) -P benchmarks/prefill.py

clean:
	rm -rf $(VENV) build *.egg-info
