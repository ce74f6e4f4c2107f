# LlamaOps developer entry points. `make test` is what CI runs.
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN    = $(VENV)/bin

.PHONY: venv binaries crds chart demo demo-down lint test unit cluster-up cluster-down clean

# The project with its test extra, and the dev tooling, a distribution of its own (operator/dev).
$(BIN)/llamaops: pyproject.toml operator/dev/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e operator/dev
	@touch $@

venv: $(BIN)/llamaops

# Real Kubernetes binaries (and Ollama, for the dev node's Ollama serving) built from the Go module proxy
# into a cache keyed by version.
binaries:
	@hack/build-binaries.sh && hack/build-ollama.sh

# Render crds/ (and the chart's crds/) from the API models.
crds: venv
	$(BIN)/python -m llamaops.tools.crdgen

# The Helm chart's generated files (CRDs, RBAC rules from operator/llamaops/tools/rbac.py), then helm lint.
chart: crds
	$(BIN)/python -m llamaops.tools.rbac
	@LLAMAOPS_BIN_DIR=$$(hack/build-binaries.sh) && $$LLAMAOPS_BIN_DIR/helm lint --strict charts/llamaops

lint: venv
	$(BIN)/ruff check operator trainer-image tests bench

unit: venv
	$(BIN)/pytest -q tests/unit

# Builds or reuses the binaries, starts the local control plane (unless
# KUBECONFIG names a cluster) and runs every test.
# pytest's exit 5 (nothing collected) is a broken suite, so it fails too.
test: venv
	@LLAMAOPS_BIN_DIR=$$(hack/build-binaries.sh) && export LLAMAOPS_BIN_DIR && \
	  LLAMAOPS_OLLAMA_BIN_DIR=$$(hack/build-ollama.sh) && export LLAMAOPS_OLLAMA_BIN_DIR && \
	  $(BIN)/pytest -q -rs $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The main job on the local control plane (see hack/demo.sh); the cluster stays up.
demo: venv
	@hack/demo.sh

# Stop what `make demo` started: the operator, the dev node agent and the cluster.
demo-down: venv
	@hack/demo.sh down

cluster-up: venv
	@LLAMAOPS_BIN_DIR=$$(hack/build-binaries.sh) $(BIN)/llamaops dev-cluster up

cluster-down: venv
	$(BIN)/llamaops dev-cluster down

clean:
	rm -rf $(VENV) *.egg-info
