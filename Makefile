# dropmesh: `make run` sets up and starts the daemon on ./inbox; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages: open3d's shared libraries, D-Bus and notify-send for notifications.
APT_PACKAGES := libusb-1.0-0 libgl1 libegl1 libx11-6 libudev1 libgomp1 dbus dbus-daemon libnotify-bin
# Only for `make test` (and bench/claims.py): a PostgreSQL server, so that the ledger contract
# tests and the several-daemons tests run against a real one (started on loopback in a
# temporary folder by the tests themselves); ViSP's image data, whose "castel" sequence of
# real photos with a registered depth sensor tests/pipeline/test_real_photos.py reconstructs;
# Chromium (with its fonts), which Playwright drives for the dashboard's browser tests;
# The Khronos glTF validator (npm gltf-validator, installed into .tools/) checks every GLB
# the texture tests export; it needs node and npm (Debian's nodejs and npm where no node
# with its own npm is installed already).
TEST_APT_PACKAGES := postgresql visp-images-data chromium fonts-dejavu-core
GLTF_VALIDATOR := .tools/node_modules/gltf-validator/package.json
# Only for `make bench`: COLMAP's own command line, the baseline the benchmarks compare to.
BENCH_APT_PACKAGES := colmap
# `make bench BENCH_ARGS="sparse --quick"`: some suites, smaller runs (see README).
BENCH_ARGS ?=

.PHONY: run test lint bench demo sysdeps venv clean reliability pycolmap-build

run: sysdeps venv pycolmap-build
	mkdir -p inbox results
	$(BIN)/dropmesh run

test: sysdeps venv lint
	@$(MAKE) --no-print-directory sysdeps APT_PACKAGES="$(TEST_APT_PACKAGES)"
	@$(MAKE) --no-print-directory $(GLTF_VALIDATOR)
	$(BIN)/pytest -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; \
	exit $$rc

lint: venv
	$(BIN)/ruff format --check daemon pipeline tests bench
	$(BIN)/ruff check daemon pipeline tests bench
	$(BIN)/mypy

# Runs tests/reliability and regenerates RELIABILITY.md from that run (the only target that
# writes it: `make test` leaves every tracked file as it was).
reliability: sysdeps venv
	@$(MAKE) --no-print-directory sysdeps APT_PACKAGES="$(TEST_APT_PACKAGES)"
	DROPMESH_RELIABILITY_REPORT=$(CURDIR)/RELIABILITY.md $(BIN)/pytest -q tests/reliability

bench: sysdeps venv
	@$(MAKE) --no-print-directory sysdeps APT_PACKAGES="$(BENCH_APT_PACKAGES) $(TEST_APT_PACKAGES)"
	$(BIN)/python -m bench $(BENCH_ARGS)

$(GLTF_VALIDATOR):
	@command -v npm >/dev/null 2>&1 || $(MAKE) --no-print-directory sysdeps APT_PACKAGES="nodejs npm"
	npm install --silent --no-audit --no-fund --prefix .tools gltf-validator

demo: venv
	$(BIN)/dropmesh demo

sysdeps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@$(MAKE) --no-print-directory pycolmap-build
	touch $@

# With an NVIDIA GPU (nvidia-smi works), the CUDA build of pycolmap replaces the CPU one
# (both provide the module `pycolmap`, so exactly one may be installed); `dropmesh doctor`
# says which build is installed. Without a GPU nothing changes.
PYCOLMAP_CUDA := pycolmap-cuda12>=4.2.1,<4.3
pycolmap-build:
	@if nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -m pip show -q pycolmap-cuda12 >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing the CUDA build of pycolmap in place of the CPU one"; \
	  $(BIN)/python -m pip uninstall -q -y pycolmap pycolmap-cuda12 && \
	  $(BIN)/python -m pip install -q '$(PYCOLMAP_CUDA)'; \
	elif nvidia-smi >/dev/null 2>&1 && $(BIN)/python -m pip show -q pycolmap >/dev/null 2>&1; then \
	  echo "both pycolmap builds are installed: keeping only the CUDA one"; \
	  $(BIN)/python -m pip uninstall -q -y pycolmap pycolmap-cuda12 && \
	  $(BIN)/python -m pip install -q '$(PYCOLMAP_CUDA)'; \
	fi

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache *.egg-info
