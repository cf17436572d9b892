# Two entry points for a fresh clone: `make smoke` and `make test`. Both create .venv
# (with the machine's python3) and install the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp

# `pretrain plan` compiles for TPU under the `tpu` extra, jax 0.12 with libtpu 0.0.52, which need
# Python 3.12; the rest (torch's CPU build included) runs on the machine's python3.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12))
TPU_VENV ?= .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed-stamp
TPU_TESTS := tests/test_plan.py

.PHONY: smoke test bench tpu-venv

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(TPU_STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 found for $(TPU_VENV) (jax 0.12 with libtpu 0.0.52); pass PYTHON312=/path/to/python3.12" >&2; exit 2; }
	test -x $(TPU_VENV)/bin/python || $(PYTHON312) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(TPU_VENV)/bin/python -m pip install -q -e '.[tpu,tpu-test]'
	touch $(TPU_STAMP)

tpu-venv: $(TPU_STAMP)

smoke: $(STAMP)
	$(VENV)/bin/pretrain smoke llm

# Two workers, each taking whole test files (so a file's shared fixtures are built once).
# The TPU compiles run in $(TPU_VENV).
test: $(STAMP) $(TPU_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 $(addprefix --ignore=,$(TPU_TESTS))
	$(TPU_VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 $(TPU_TESTS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/train_throughput.py configs/llm/smoke.yaml runtime.fake_cpu_devices=8
