# The two commands: `make test` and `make study`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bwssl-installed
STUDY := runs/study-$(shell date +%Y%m%d-%H%M%S)

.PHONY: env test study chromium

env: $(STAMP)

# Re-runs only when the requirements change; the editable install picks up code changes by itself.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

# The browser test drives Debian's chromium with Playwright from pip (never `playwright install`): apt-get
# installs it for `make test` only (with sudo when not root); `make study` does not need it.
chromium:
	test -x /usr/bin/chromium || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest tests

# The study: notebooks 01-04 executed by Papermill into runs/study-<timestamp>/, then report.html
# (a GPU, when there is one, picks the larger `gpu` study; PARAMS="-p steps 400" overrides).
study: $(STAMP)
	$(BIN)/bwssl study --out $(STUDY) $(PARAMS)
