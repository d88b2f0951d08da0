# pe-node: `make run` sets up .venv and starts the node; `make test` sets up, installs the test tools, runs all tests.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
# torch and torchvision are pinned: these builds install from the local wheel cache on the project's machines,
# where a looser pin would download a multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1
# Debian packages the tests start as real peers: the command (or file) to look for, the package that provides it.
TEST_TOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc \
	/usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb \
	/usr/lib/postgresql/*/bin/pg_ctl:postgresql openssl:openssl chromium:chromium ojph_compress:openjph-tools
# The viewer tests' npm packages (the OHIF Viewer, puppeteer-core), pinned by tests/viewer/package-lock.json.
VIEWER := tests/viewer

.PHONY: run setup demo test test-setup system-tools viewer-tools lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/pe-node serve --config $(CONFIG)

# With `make run` going in another terminal: send one synthetic CTPA with a clot and print what the node found.
demo: setup
	$(BIN)/python -m pe_node.demo --config $(CONFIG)

# Install the Debian tools the tests need when they are missing and we may (root); otherwise say what is missing.
system-tools:
	@missing=""; for pair in $(TEST_TOOLS); do \
	    check=$${pair%%:*}; \
	    case $$check in /*) ls $$check >/dev/null 2>&1 ;; *) command -v $$check >/dev/null 2>&1 ;; esac \
	        || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "installing:$$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	    else \
	        echo "warning: missing Debian packages:$$missing (tests that need them are skipped)"; \
	    fi; \
	fi

# npm ci, again only when the lock file changed. No browser is downloaded: the tests drive the chromium package.
$(VIEWER)/node_modules/.installed: $(VIEWER)/package.json $(VIEWER)/package-lock.json
	cd $(VIEWER) && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

viewer-tools:
	@if command -v npm >/dev/null 2>&1; then \
	    $(MAKE) --no-print-directory $(VIEWER)/node_modules/.installed; \
	else \
	    echo "warning: npm is missing (the OHIF viewer tests are skipped, or fail under CI=true)"; \
	fi

test-setup: $(BIN)/.installed-test system-tools viewer-tools

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade) over the tree, mypy over pe_node/ (pyproject.toml)
lint: $(BIN)/.installed-test
	$(BIN)/ruff check pe_node training tests bench
	$(BIN)/mypy

test: test-setup lint
	$(BIN)/pytest

bench: test-setup
	$(BIN)/python bench/bench_ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache $(VIEWER)/node_modules
