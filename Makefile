# Two commands do everything: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,bench
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export HF_HUB_OFFLINE ?= 1

# Split runs take IMAGE_DIR= and ANNOTATIONS= (and any other flags in ARGS=).
SPLIT_ARGS = $(if $(IMAGE_DIR),--image-dir $(IMAGE_DIR)) \
             $(if $(ANNOTATIONS),--annotations $(ANNOTATIONS)) $(ARGS)

.PHONY: install demo test test-fast test-stress test-machines fuzz lint bench train val_seen val_unseen clean

$(STAMP): setup.cfg pyproject.toml tools/install.sh
	PYTHON=$(PYTHON) bash tools/install.sh $(VENV) $(EXTRAS)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hnm.demo data/demo
	$(BIN)/python launch.py --config configs/demo.yaml $(ARGS)

# Every usable core runs tests (pytest-xdist; a test file per process, so a file's
# fixtures are built once), and the 25 slowest are listed.
PYTEST = $(BIN)/python -m pytest -q -n "$$(nproc)" --dist loadfile --durations=25

# Style (ruff) and layers (import-linter: the contract in pyproject.toml), before any test.
LINT = $(BIN)/ruff check . && $(BIN)/lint-imports --no-cache

test: $(STAMP)
	$(LINT)
	$(PYTEST) $(ARGS)

# The inner loop: everything but the tests that start processes or real encoders.
test-fast: $(STAMP)
	$(LINT)
	$(PYTEST) -m "not slow" $(ARGS)

# The tests that start processes (marker `processes`) as a loaded or small machine runs
# them: three rounds in a row while another process keeps a core busy, then on one core
# (sharing it with the busy process). Each round must pass.
BUSY = $(BIN)/python -c "while True: pass"
test-stress: $(STAMP)
	$(BUSY) & busy=$$!; trap 'kill $$busy' EXIT; \
	for round in 1 2 3; do \
	    echo "== round $$round of 3, one core kept busy"; \
	    $(PYTEST) -m processes $(ARGS) || exit 1; \
	done; \
	kill $$busy; taskset -c 0 $(BUSY) & busy=$$!; \
	echo "== one core (taskset -c 0), kept busy"; \
	taskset -c 0 sh -c '$(PYTEST) -m processes $(ARGS)'

# The suite as other machines run it: the CPU kinds `auto` tells apart (tests/cpuinfo),
# one core, and no FAISS.
test-machines: $(STAMP)
	for kind in avx2 avx512_bf16 amx; do \
	    echo "== CPU kind: $$kind"; HNM_CPUINFO=tests/cpuinfo/$$kind $(PYTEST) $(ARGS) || exit 1; \
	done
	echo "== one core"; taskset -c 0 sh -c '$(PYTEST) $(ARGS)'
	echo "== no FAISS"; PYTHONPATH=tests/no_faiss $(PYTEST) $(ARGS)

# Generated bad inputs, many more than `make test` runs (HNM_FUZZ_EXAMPLES cases a surface,
# whole runs among them); prints the cases run and their outcomes per surface.
HNM_FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	HNM_FUZZ_EXAMPLES=$(HNM_FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -s tests/test_fuzz.py $(ARGS)

lint: $(STAMP)
	$(LINT)

bench: $(STAMP)
	$(BIN)/python bench/bench_mining.py $(ARGS)

train val_seen val_unseen: $(STAMP)
	$(BIN)/python launch.py --config configs/$@.yaml $(SPLIT_ARGS)

clean:
	rm -rf runs data/demo
