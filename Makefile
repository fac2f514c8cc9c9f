# Two entry points, each creating the environment on first use:
#   make demo   - the 2-D toy problem with every core method (plot + table in deconflict-demo/)
#   make test   - ruff, mypy and the whole test suite (what CI runs)
#   make docs   - the API reference, built offline from the docstrings (build/api-html)
#   make bench  - the benchmarks of docs/performance.md and docs/distributed.md (about 80 minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench docs clean
.PRECIOUS: $(VENV)/.installed-%

# $(VENV)/.installed-EXTRA: deconflict installed (editable) with that extra of pyproject.toml;
# the demo needs `experiments` (plots, progress bars), the tests `test` (which includes it).
# PyTorch first, pinned: the CPU wheel of this machine. The project itself asks for torch>=2.4,
# which the installed 2.13.0 satisfies, so pip fetches nothing bigger.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-experiments
	$(BIN)/deconflict demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy src/deconflict
	$(BIN)/python -m pytest

# LibMTL is compared in the benchmarks only. Its PyPI dependencies (torchvision) do not import
# with the CPU torch, and its weighting modules need only torch, numpy and scipy: hence --no-deps.
bench: $(VENV)/.installed-test
	$(BIN)/pip install --quiet --no-deps LibMTL==1.1.5
	cd benchmarks && ../$(BIN)/python aggregation.py
	cd benchmarks && ../$(BIN)/python step.py
	cd benchmarks && ../$(BIN)/python memory.py
	cd benchmarks && ../$(BIN)/python many_tasks.py
# gpu.py: the CUDA checks and the GPU step benchmark where there is a GPU; status 2 means none.
	cd benchmarks && { ../$(BIN)/python gpu.py || test $$? -eq 2; }
	cd benchmarks && ../$(BIN)/python non_finite.py --repeats 5
	cd benchmarks && ../$(BIN)/python distributed.py

docs: $(VENV)/.installed-docs
	$(BIN)/sphinx-build -W -b html docs/api build/api-html

clean:
	rm -rf $(VENV) deconflict-demo .mypy_cache
