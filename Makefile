# Two commands on a fresh machine: `make demo` (the main job: the web demo) and `make test`.
# Each creates .venv at the repository root and installs into it on first use; `make test` also finds an
# ffmpeg (the system one, else the imageio-ffmpeg wheel's, linked into .venv/bin) and the browser the
# browser test drives (Debian's chromium: installed here when run as root, else the one command is printed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together here (open-clip needs torchvision).
TORCH := torch==2.14.1 torchvision==0.29.1
CHROMIUM := /usr/bin/chromium
# `make test-newest-transformers`: the adapter tests against the newest transformers release, installed
# into this folder (put first on PYTHONPATH), so the main .venv keeps the tested version.
NEWEST := .newest-transformers
ADAPTER_TESTS := tests/test_adapter_llava_family.py tests/test_adapter_qwen.py tests/test_adapter_internvl.py \
	tests/test_patching.py tests/test_llm_attention.py tests/test_tower_only_merge.py tests/test_vision_merge.py \
	tests/test_steps.py tests/test_issue9_defects.py tests/test_compat.py

.PHONY: demo compare test bench install clean ffmpeg browser test-newest-transformers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The tests call `ffmpeg` by name: without a system one, link the imageio-ffmpeg wheel's binary into
# .venv/bin, which `make test` puts first on PATH.
ffmpeg: $(STAMP)
	@command -v ffmpeg >/dev/null || [ -e $(VENV)/bin/ffmpeg ] || \
	  $(PY) -c "import imageio_ffmpeg, os; os.symlink(imageio_ffmpeg.get_ffmpeg_exe(), '$(VENV)/bin/ffmpeg')"

# Playwright cannot download browsers here: the browser test drives Debian's chromium.
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "NOTE: the browser test is skipped: it needs Debian's chromium. Run:  sudo apt-get install -y chromium"; \
	fi

demo: $(STAMP)
	$(PY) -P -m vlmcompress.demo.app $(ARGS)

compare: $(STAMP)
	$(PY) -P -m vlmcompress.demo $(ARGS)

test: $(STAMP) ffmpeg browser
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -P -m pytest -q -n 2 $(ARGS)

# Optional, allowed to fail: tells early when a new transformers release breaks an undocumented behaviour
# the adapters rely on (vlmcompress/adapters/compat.py lists them). Not part of `make test` / .ci/run.
test-newest-transformers: $(STAMP) ffmpeg
	$(PY) -m pip install -q --upgrade --target $(NEWEST) transformers tokenizers huggingface-hub safetensors
	PYTHONPATH="$(CURDIR)/$(NEWEST)" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -P -c \
	  "import transformers; print('transformers', transformers.__version__)"
	PYTHONPATH="$(CURDIR)/$(NEWEST)" PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -P -m pytest -q -n 2 $(ADAPTER_TESTS) $(ARGS)

bench: $(STAMP)
	$(PY) -P benchmarks/ops.py
	$(PY) -P benchmarks/kernels.py
	$(PY) -P benchmarks/prefill.py
	$(PY) -P benchmarks/tower.py --vision-layers 4

clean:
	rm -rf $(VENV) $(NEWEST) build *.egg-info
