# Everything a newcomer needs: `make test`, `make demo`, `make bench`.
# The virtual environment is created on first use. CI points VENV at a folder outside the clone,
# keyed by setup.cfg's hash, so that runs share one 6 GB torch install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build served by this project's package mirror; elsewhere any torch>=2.4 works (setup.cfg).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEPS_STAMP := $(VENV)/.cdb_hf-deps-$(shell sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)
# Tests and the demo never touch the network.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# OpenMP threads that busy-wait make torch 10-20x slower whenever another process shares the cores.
PASSIVE := OMP_WAIT_POLICY=PASSIVE

.PHONY: install test lint demo bench mutants clean

$(DEPS_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "setuptools>=68" wheel
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# Re-point the editable install at this checkout (the venv may be shared between clones).
install: $(DEPS_STAMP)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .

lint: install
	$(BIN)/python -m ruff check cdb_hf tests bench run_finetune.py

# Two pytest workers (each test file stays on one worker, so its module fixtures run once): on a 2-core
# machine the suite takes about half the time. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint
	$(OFFLINE) $(PASSIVE) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Fine-tunes the built-in pretrained EfficientNet-Lite0 on built-in MNIST digits, with and without CDB.
demo: install
	$(OFFLINE) $(PASSIVE) $(BIN)/python -m cdb_hf.demo

bench: install
	$(OFFLINE) $(PASSIVE) $(BIN)/python bench/overhead.py
	$(OFFLINE) $(PASSIVE) $(BIN)/python bench/throughput.py
	$(OFFLINE) $(PASSIVE) $(BIN)/python bench/image_check.py

# Mutation testing (not part of `make test` or CI): mutmut 3 mutates the core, the run folder's lifecycle and
# the resume/overwrite checks, runs only the tests (of test_core.py, test_run_dir.py and test_fsdp.py, whose
# two-rank tests it leaves out: see setup.cfg) that reach each mutant, and writes the score to
# bench/results/mutation_score.json. Niced: it takes the cores.
# (The pre-flight planners of the output folder and the resume checkpoint are tested end to end in
# test_safety.py, too slow to run per mutant; add them here once fast tests reach them.)
MUTANTS ?= cdb_hf.core.* cdb_hf.run_dir.* cdb_hf.resume.x_check_resume_matches__* \
	cdb_hf.resume.x_loop_state_error__*
MUTANT_WORKERS ?= 2
mutants: install
	$(BIN)/python -m pip install -q -e ".[mutants]"
	rm -rf mutants
	$(OFFLINE) $(PASSIVE) nice -n 15 $(BIN)/mutmut run --max-children $(MUTANT_WORKERS) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/python bench/mutation_score.py --scope $(foreach m,$(MUTANTS),'$(m)')

clean:
	rm -rf .venv build *.egg-info .pytest_cache mutants
