# `make app` runs the demo, `make test` runs the tests; both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: app test lint install install-dev test-tools

# Re-install only when a requirements file or pyproject.toml changes.
.cache/installed: requirements.txt pyproject.toml
	$(PIP) -r requirements.txt -e .
	@mkdir -p .cache && touch $@

.cache/installed-dev: .cache/installed requirements-dev.txt requirements-rebuild.txt requirements-rebuild-nodeps.txt
	$(PIP) -r requirements-dev.txt -r requirements-rebuild.txt
	$(PIP) --no-deps -r requirements-rebuild-nodeps.txt
	@touch $@

install: .cache/installed
install-dev: .cache/installed-dev

app: .cache/installed
	$(PYTHON) app.py

# Debian tools the tests drive: chromium for the app's browser test (through Playwright, never a
# downloaded browser) and git-lfs for the Space build test.
test-tools:
	@test -x /usr/bin/chromium && git lfs version >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium git-lfs; }

test: .cache/installed-dev test-tools
	$(PYTHON) -m pytest

lint: .cache/installed-dev
	ruff check . && ruff format --check .
