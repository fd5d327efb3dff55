# lctool: every target sets itself up into .venv/ first, so `make demo` and `make test` work on a fresh clone.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
LCTOOL  := .venv/bin/lctool
STAMP   := .venv/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# Side environments for interop tests and reference runs (GPTQModel, mergekit): kept out of .venv so
# their pins never move lctool's own torch/transformers, and in the per-machine cache so a fresh clone
# on the same machine does not rebuild them.
LCTOOL_CACHE ?= $(HOME)/.cache/lctool
export LCTOOL_CACHE
export GPTQ_VENV ?= $(LCTOOL_CACHE)/venvs/gptqmodel-7.6.0
export LCTOOL_MERGEKIT_VENV ?= $(LCTOOL_CACHE)/venvs/mergekit-0.1.5

.PHONY: setup side-envs demo test test-fast bench lint soak clean testbed

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'; print('torch', torch.__version__)"
	touch $(STAMP)

side-envs:
	bash bench/setup_gptq_env.sh
	bash bench/setup_mergekit.sh

demo: setup
	bash demo/run.sh

test: setup side-envs
	$(PY) -c "from lctool.data import prepare_all; prepare_all()"
	$(LCTOOL) --quiet testbed build
	$(PY) -m pytest -n 2 --timeout 900 -q

test-fast: setup
	$(PY) -m pytest -n 2 -q -m "not testbed and not slow"

testbed: setup
	$(LCTOOL) testbed build

bench: setup side-envs
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lint: setup
	.venv/bin/ruff check lctool tests bench

# The long reliability run: thousands of corrupt inputs, 20+ SIGKILLs per writing command, disk-full
# limits, races (tests/reliability and the safetensors fuzz at LCTOOL_SOAK=1), niced; the counts land in
# $(SOAK_LOG) and are summed at the end (bench/results/reliability.md records a run).
SOAK_LOG ?= logs/soak-reliability.jsonl
soak: setup
	mkdir -p $(dir $(SOAK_LOG)) && rm -f $(SOAK_LOG)
	LCTOOL_SOAK=1 LCTOOL_RELIABILITY_LOG=$(abspath $(SOAK_LOG)) nice -n 10 $(PY) -m pytest -n 2 --timeout 14400 -q \
		tests/reliability tests/test_io_fuzz.py tests/test_examples.py; status=$$?; $(PY) -m tests.reliability.report $(SOAK_LOG); exit $$status

clean:
	rm -rf .venv build *.egg-info demo-out
