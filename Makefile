# Two entry points, each creating the environment on first use:
#   make demo   - the 2-D toy problem with every core method (plot + table in deconflict-demo/)
#   make test   - ruff and the whole test suite (what CI runs)
#   make bench  - the benchmarks of docs/performance.md and docs/distributed.md (about 40 minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

# PyTorch first, pinned: the CPU wheel of this machine. The project itself asks for torch>=2.4,
# which the installed 2.13.0 satisfies, so pip fetches nothing bigger.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deconflict demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# LibMTL is compared in the benchmarks only. Its PyPI dependencies (torchvision) do not import
# with the CPU torch, and its weighting modules need only torch, numpy and scipy: hence --no-deps.
bench: $(STAMP)
	$(BIN)/pip install --quiet --no-deps LibMTL==1.1.5
	cd benchmarks && ../$(BIN)/python aggregation.py
	cd benchmarks && ../$(BIN)/python step.py
	cd benchmarks && ../$(BIN)/python memory.py
	cd benchmarks && ../$(BIN)/python many_tasks.py
	cd benchmarks && ../$(BIN)/python non_finite.py --repeats 5
	cd benchmarks && ../$(BIN)/python distributed.py

clean:
	rm -rf $(VENV) deconflict-demo
