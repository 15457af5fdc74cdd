# Entry points for a fresh machine:  `make demo`,  `make test`  and  `make lint`.
# Each creates ./.venv on first use, installs what requirements*.txt list and this package (editable,
# so `import mvp_diff` works from any folder).
PYTHON ?= python3
VENV ?= .venv
# PyTorch pair known to work together; on a CPU-only machine you may instead install the CPU
# wheels yourself into .venv before `make` (see README, "Installing").
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mvp_diff.demo

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .

clean-demo:
	rm -rf demo
