PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Until training lands (issue 4), the demo runs the data part end to end.
demo: $(STAMP)
	$(BIN)/python -m data_pipeline synthetic --out $(DEMO_DIR)/slides --slides 12 --size 2048 --seed 0
	$(BIN)/python -m data_pipeline tile --manifest $(DEMO_DIR)/slides/manifest.csv --out $(DEMO_DIR)/data --patch-size 64 --workers 2
	$(BIN)/python -m data_pipeline stats --data-dir $(DEMO_DIR)/data --tau 0.03 0.1 0.2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/tiling.py

clean:
	rm -rf $(VENV) runs
