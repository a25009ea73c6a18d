# The two commands: `make test` and `make study`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bwssl-installed
STUDY := runs/study-$(shell date +%Y%m%d-%H%M%S)

.PHONY: env test study

env: $(STAMP)

# Re-runs only when the requirements change; the editable install picks up code changes by itself.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Until the study notebooks land: E2E and blockwise (K = 2, 4) pretraining of the CPU preset on
# moving shapes made in memory, into one study folder.
study: $(STAMP)
	for k in 1 2 4; do \
	  $(BIN)/bwssl pretrain --out $(STUDY)/k$$k --preset cpu --blocks $$k --steps 300 --batch-size 16 \
	    --base-lr 3e-3 --warmup-steps 30 --log-every 25 || exit 1; \
	done
	@echo "study written to $(STUDY)"
