# Set-up on a fresh machine: a virtual environment in .venv with torch, torchvision, the test
# tools and dcnlab itself (its extension compiled with ninja).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SOURCES := $(shell find csrc dcnlab -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup test train bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) setuptools wheel ninja pytest numpy ruff
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The default training run: a 2D synthetic deformation task on the CPU.
train: setup
	$(PY) -m dcnlab train

bench: setup
	$(PY) scripts/bench_op.py

clean:
	rm -rf build dcnlab/*.so $(VENV)
