# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean constraints docs

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch first, then everything else with torch pinned, so pip never pulls a CUDA build;
	# constraints.txt pins every other package, so two fresh machines get the same versions.
	$(PIP) install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The loop on the embedded demo world (a tiny VLM and synthetic Russian data), 5 minutes.
demo: $(STAMP)
	$(PY) -m loop run --preset demo --gpu cpu --budget 5m --db experiments.db
	@echo "--- the base model's errors on dev, as the policy saw them first"
	$(PY) -m loop show 1 --db experiments.db --examples 0
	@echo "--- every cycle, and the verdict on the held-out final split"
	$(PY) -m loop log --db experiments.db
	@echo "--- the demo world these figures come from (other weights, other figures)"
	$(PY) -m core.demo

# Plain `pytest` skips the slow tier; `make test` (and CI) runs it too.
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check loop core strategies tests bench

bench: $(STAMP)
	$(PY) bench/eval_speed.py

# The flag reference in docs/cli.md, made anew from the parser (tests/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m loop.cli_reference

# After an upgrade in a working venv: rewrite constraints.txt from the installed versions.
constraints: $(STAMP)
	$(PY) .ci/constraints.py

clean:
	rm -rf $(VENV) .demo .pytest_cache
