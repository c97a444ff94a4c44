PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# Exact versions of every dependency (all extras, every platform), generated from pyproject.toml by `make lock`.
LOCK := requirements.lock
UV_VERSION := 0.13.10

.PHONY: install lock lowest demo experiments comparison lint test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Today's releases within pyproject.toml's bounds, for Python 3.11+ on any platform; then `make test`.
lock: | $(BIN)/python
	$(BIN)/pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 --upgrade \
	  --custom-compile-command "make lock" --quiet -o $(LOCK)

# JAX's persistent compilation cache for the commands below (unless set already): the runs of a grid
# compile the same programs, and a rerun of the demo compiles nothing again.
demo experiments: export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/runs/.jax_compilation_cache

# The whole suite at pyproject.toml's lower bounds (uv's lowest-direct resolution) in its own venv
# (seeded with pip, which the wheel test runs).
LOWEST_VENV := .venv-lowest
lowest: | $(BIN)/python
	$(BIN)/pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv venv -q --clear --seed -p 3.11 $(LOWEST_VENV)
	VIRTUAL_ENV=$(LOWEST_VENV) $(BIN)/uv pip install -q --resolution lowest-direct -e ".[test]"
	$(LOWEST_VENV)/bin/python -m pytest -q -n 2 tests

# Synthetic slides (2 µm/pixel) -> patches of 64 pixels at 2 µm/pixel -> ERM and GERNE (configs/demo.py) -> test-split report in $(DEMO_DIR),
# then both runs predict the test slides whole (maps, overlays, regions) for the report's side-by-side overlay.
DEMO_TAUS := 0.03 0.1 0.2
demo: $(STAMP)
	$(BIN)/gerne-jax synthetic --out $(DEMO_DIR)/slides --slides 12 --size 2048 --seed 0
	$(BIN)/gerne-jax tile --manifest $(DEMO_DIR)/slides/manifest.csv --out $(DEMO_DIR)/data --patch-size 64 --mpp 2 --workers 2
	$(BIN)/gerne-jax stats --data-dir $(DEMO_DIR)/data --tau $(DEMO_TAUS)
	$(BIN)/gerne-jax train --config demo:erm --config.data.dir=$(DEMO_DIR)/data --workdir $(DEMO_DIR)/erm
	$(BIN)/gerne-jax train --config demo:gerne --config.data.dir=$(DEMO_DIR)/data --workdir $(DEMO_DIR)/gerne
	for checkpoint in best_wga best_bca; do \
	  $(BIN)/gerne-jax evaluate --compare $(DEMO_DIR)/erm $(DEMO_DIR)/gerne --checkpoint $$checkpoint \
	    --split test --tau $(DEMO_TAUS) --out $(DEMO_DIR)/eval || exit 1; done
	for run in gerne erm; do \
	  $(BIN)/gerne-jax predict --workdir $(DEMO_DIR)/$$run --data-dir $(DEMO_DIR)/data --split test \
	    --manifest $(DEMO_DIR)/slides/manifest.csv --out $(DEMO_DIR)/predict/$$run --tau $(DEMO_TAUS) || exit 1; done
	$(BIN)/python -m experiments.demo_report --eval-dir $(DEMO_DIR)/eval --runs $(DEMO_DIR)/erm $(DEMO_DIR)/gerne \
	  --data-dir $(DEMO_DIR)/data --tau $(DEMO_TAUS) --out $(DEMO_DIR)/report.md \
	  --predictions $(DEMO_DIR)/predict/erm $(DEMO_DIR)/predict/gerne

# The README's results: data, tuning on validation, 3 seeds, tau sweep, error vs tissue ratio (hours on CPU),
# then the open-question studies (patch size, continuous attribute; about 30 min each).
# Two processes share the runs (experiments.grid locks each run while it trains).
EXP_DIR ?= runs/exp
experiments: $(STAMP)
	$(BIN)/python -m experiments.reproduce --root $(EXP_DIR) --data-only
	$(BIN)/python -m experiments.reproduce --root $(EXP_DIR) > $(EXP_DIR)/second_process.log 2>&1 & \
	$(BIN)/python -m experiments.reproduce --root $(EXP_DIR); status=$$?; wait $$! && exit $$status
	$(BIN)/python -m experiments.patch_size --root $(EXP_DIR)/patch_size
	$(BIN)/python -m experiments.continuous_attribute --root $(EXP_DIR)/continuous

# The comparison of every method (docs/comparison.md): tuning on calibration data, 5 seeds on two fresh data
# sets (hours on CPU); two processes share the runs, and running it again resumes.
COMPARISON_DIR ?= runs/comparison
comparison: export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/runs/.jax_compilation_cache
comparison: $(STAMP)
	mkdir -p $(COMPARISON_DIR)
	$(BIN)/python -m experiments.comparison --root $(COMPARISON_DIR) > $(COMPARISON_DIR)/second_process.log 2>&1 & \
	$(BIN)/python -m experiments.comparison --root $(COMPARISON_DIR); status=$$?; wait $$! && exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/tiling.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) runs
