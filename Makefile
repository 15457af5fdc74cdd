# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# Both create ./.venv on first use and install what requirements*.txt list.
PYTHON ?= python3
VENV ?= .venv
# PyTorch pair known to work together; on a CPU-only machine you may instead install the CPU
# wheels yourself into .venv before `make` (see README, "Installing").
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: setup demo test clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mvp_diff.demo

test: setup
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo
