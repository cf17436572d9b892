# Two entry points for a fresh clone: `make smoke` and `make test`. Both create .venv
# (with the machine's python3) and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: smoke test bench

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

smoke: $(STAMP)
	$(VENV)/bin/pretrain smoke llm

# Two workers, each taking whole test files (so a file's shared fixtures are built once).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/train_throughput.py configs/llm/smoke.yaml runtime.fake_cpu_devices=8
