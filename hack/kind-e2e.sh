#!/usr/bin/env bash
# Runs the cluster tests against a kind cluster instead of the local control
# plane (needs Docker, kind and kubectl): creates the cluster, makes its nodes
# look like GPU nodes (labels, plus nvidia.com/gpu in capacity and allocatable,
# patched into the node status), runs `pytest -m cluster` with KUBECONFIG set,
# and deletes the cluster. Extra arguments go to pytest.
#   KIND_CLUSTER_NAME (llamaops-e2e), GPUS_PER_NODE (8), GPU_PRODUCT, PYTHON
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
name=${KIND_CLUSTER_NAME:-llamaops-e2e}
gpus=${GPUS_PER_NODE:-8}
product=${GPU_PRODUCT:-NVIDIA-H100-80GB-HBM3}
python=${PYTHON:-$repo/.venv/bin/python}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "kind-e2e: '$tool' is not on PATH" >&2; exit 1; }
done

KUBECONFIG=$(mktemp)
export KUBECONFIG
cleanup() { kind delete cluster --name "$name" >/dev/null 2>&1 || true; rm -f "$KUBECONFIG"; }
trap cleanup EXIT

kind create cluster --name "$name" --kubeconfig "$KUBECONFIG" --wait 180s

for node in $(kubectl get nodes -o name); do
  kubectl label "$node" --overwrite \
    nvidia.com/gpu.present=true nvidia.com/gpu.product="$product" nvidia.com/gpu.count="$gpus"
  # The status subresource takes the JSON patch (same as PATCH .../status via
  # `kubectl proxy`); "~1" escapes the "/" in the resource name.
  kubectl patch "$node" --subresource=status --type=json -p "[
    {\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$gpus\"},
    {\"op\": \"add\", \"path\": \"/status/allocatable/nvidia.com~1gpu\", \"value\": \"$gpus\"}]"
done
kubectl get nodes -o custom-columns='NAME:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu'

cd "$repo"
"$python" -m pytest -m cluster -rs "$@"
