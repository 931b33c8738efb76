# One command to run echod, one to test it. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint format venv clean soak generated deb dist image bench-peers bench-100k

$(BIN)/echod: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/echod

run: venv
	$(BIN)/echod --foreground

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A chaos soak (by hand, not part of `make test`): load plus random SIGKILL, HUP,
# TTIN/TTOU, USR1 and USR2 against echod -w 4; prints a JSON summary, exits 1 if an
# invariant broke. SOAK_ARGS='--duration 20' for a quick run (default 120 s).
soak: venv
	$(BIN)/python benchmarks/soak.py $(SOAK_ARGS)

# echod against refecho (C) and uvloop, pinned 1 worker and unpinned 2 workers, the
# runs behind README "Performance" (~20 min on 2 cores; needs uvloop in the venv).
# BENCH_ARGS are environment settings of benchmarks/peers.sh, e.g. 'PARTS=w1 REPEAT=5'.
bench-peers: venv
	env $(BENCH_ARGS) benchmarks/peers.sh

# 100,000 connections held by 7 workers while rr-64B-c50 runs beside them (~1 min;
# needs echoload, built by bench-peers). BENCH_ARGS are hold100k.py's flags.
bench-100k: venv
	$(BIN)/python benchmarks/hold100k.py $(BENCH_ARGS)

# Style (ruff check, and ruff format: `make format` applies it), the package
# boundaries (lint-imports, contracts in pyproject.toml) and dead code (vulture).
# All run even when one fails, so one run shows every problem; lint fails if any did.
lint: venv
	@status=0; \
	$(BIN)/ruff check echod tests benchmarks tools container || status=1; \
	$(BIN)/ruff format --check echod tests benchmarks tools container || status=1; \
	$(BIN)/lint-imports --no-logo || status=1; \
	$(BIN)/vulture || status=1; \
	exit $$status

# Man pages and shell completions under echod/data, generated from the argparse
# parsers and the Config dataclass (tools/docgen); a unit test fails when they drift.
generated: venv
	PYTHONPATH=tools $(BIN)/python -m docgen

# The Debian package, with Debian's own tools, on Debian 12 (build dependencies:
# `apt-get build-dep .`; no venv needed). dpkg-buildpackage writes its results
# next to the source directory; they are moved to dist/.
DEB_VERSION = $(shell dpkg-parsechangelog -S Version 2>/dev/null)
# Debian's python3 builds Debian's package: one earlier in PATH (pyenv, a venv)
# has neither Debian's build modules nor its dist-packages layout.
deb:
	PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc
	mkdir -p dist
	mv ../echod_$(DEB_VERSION)_all.deb ../echod_$(DEB_VERSION)_*.buildinfo \
		../echod_$(DEB_VERSION)_*.changes dist/
	@echo "built dist/echod_$(DEB_VERSION)_all.deb"

# The OCI image localhost/echod:<version>, with podman, from the .deb above on a
# Debian 12 base made here (container/base-rootfs.sh, cached in
# /var/cache/echod-image). --format docker: the OCI format drops HEALTHCHECK;
# --network=host: apt in the build reaches the host's mirrors.
# container/containers.conf carries what podman needs on hosts like CI's
# (runc, cgroupfs, ulimits); an exported CONTAINERS_CONF wins.
IMAGE_VERSION = $(shell dpkg-parsechangelog -S Version 2>/dev/null | sed 's/-[^-]*$$//')
IMAGE = localhost/echod:$(IMAGE_VERSION)
export CONTAINERS_CONF ?= $(CURDIR)/container/containers.conf
image:
	base=$$(container/base-rootfs.sh) && \
	$(MAKE) --no-print-directory deb && \
	podman build --format docker --network=host --ignorefile container/containerignore \
		--file container/Containerfile --build-arg BASE="$$base" \
		--build-arg DEB=dist/echod_$(DEB_VERSION)_all.deb --build-arg VERSION=$(IMAGE_VERSION) \
		--tag $(IMAGE) .
	@echo "built $(IMAGE) ($$(podman image inspect --format '{{.Size}}' $(IMAGE)) bytes)"

# The wheel and the sdist in dist/, checked by twine (--strict: the README must
# render on PyPI, every required metadata field present).
dist: venv
	rm -rf dist/echod-*.tar.gz dist/echod-*.whl
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/echod-*.tar.gz dist/echod-*.whl

format: venv
	$(BIN)/ruff format echod tests benchmarks tools container

clean:
	rm -rf $(VENV) build dist .pybuild *.egg-info .pytest_cache .ruff_cache .import_linter_cache .grimp_cache
