#!/usr/bin/env bash
# `make demo`: LlamaOps' main job on the local control plane.
#
#   1. the local control plane with simulated GPU nodes (llamaops dev-cluster up)
#   2. the CRDs, the operator, a PVC with a tiny Llama and a chat dataset made here
#   3. `kubectl apply -f examples/tiny-llama-cpu.yaml`: validated, queued, admitted,
#      a training Job created with its ConfigMap, ServiceAccount/Role and Service
#   4. the trainer trains for real on this CPU, with the spec the Job mounts and the
#      PVC layout its pod sees, reporting progress into the object's status
#      (kwok simulates the pod itself; this script then writes its exit as the kubelet would)
#   5. the operator marks the run Succeeded with the adapter's location
#
# The cluster stays up; `make cluster-down` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
bin=$(hack/build-binaries.sh)
llamaops=.venv/bin/llamaops
export LLAMAOPS_HOME=${LLAMAOPS_HOME:-$HOME/.llamaops}
demo=$LLAMAOPS_HOME/demo
ns=llamaops-demo
run=tiny-llama-cpu

say "local control plane"
kubeconfig=$(LLAMAOPS_BIN_DIR=$bin $llamaops dev-cluster up | tail -n 1)
export KUBECONFIG=$kubeconfig
k() { "$bin/kubectl" "$@"; }
k get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu,PRODUCT:.metadata.labels.nvidia\.com/gpu\.product'

say "CRDs and the seed's recipes, checked offline (the operator runs the same checks)"
k apply --server-side --force-conflicts -f crds/ >/dev/null
k wait --for=condition=Established crd/llamafinetunes.llamaops.io crd/llamaserves.llamaops.io >/dev/null
$llamaops validate -f examples/llama-3.3-70b-qlora.yaml -f examples/llama-3.1-8b-lora.yaml -f examples/llama-3.1-8b-serve.yaml

say "a tiny Llama and a chat dataset on the demo PVC"
mkdir -p "$demo/pvc/$ns/models" "$demo/pvc/$ns/datasets"
if [ ! -f "$demo/pvc/$ns/models/tiny-llama/config.json" ]; then
  .venv/bin/python -m llamaops_trainer.tiny --model-dir "$demo/pvc/$ns/models/tiny-llama" \
    --dataset "$demo/pvc/$ns/datasets/chat.jsonl"
fi
k get namespace $ns >/dev/null 2>&1 || k create namespace $ns >/dev/null
k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: $ns}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: "$demo/pvc/$ns"}
  claimRef: {namespace: $ns, name: $ns}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $ns, namespace: $ns}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: $ns
  resources: {requests: {storage: 10Gi}}
YAML

say "the operator"
pkill -f "llamaops operator" 2>/dev/null || true
$llamaops operator > "$demo/operator.log" 2>&1 &
echo "log: $demo/operator.log"
sleep 3

say "kubectl apply -f examples/tiny-llama-cpu.yaml"
k delete lft -n $ns $run --ignore-not-found >/dev/null
rm -rf "$demo/pvc/$ns/adapters/$run"
k apply -n $ns -f examples/tiny-llama-cpu.yaml
for _ in $(seq 60); do
  phase=$(k get lft -n $ns $run -o jsonpath='{.status.phase}')
  [ "$phase" = Running ] && break
  sleep 0.5
done
k get lft -n $ns
k get job,configmap,serviceaccount,role,service -n $ns -l llamaops.io/finetune=$run

say "training (the trainer on this CPU, in the pod's place)"
spec=$(mktemp)
k get configmap -n $ns $run-spec -o jsonpath='{.data.spec\.yaml}' > "$spec"
( while sleep 2; do k get lft -n $ns $run --no-headers 2>/dev/null | sed 's/^/  /'; done ) &
watcher=$!
LLAMAOPS_NAME=$run LLAMAOPS_NAMESPACE=$ns LLAMAOPS_PVC_ROOT="$demo/pvc" \
  .venv/bin/python -m llamaops_trainer --spec "$spec" > "$demo/trainer.log" 2>&1 || {
    kill $watcher; echo "training failed; see $demo/trainer.log" >&2; tail -20 "$demo/trainer.log" >&2; exit 1; }
kill $watcher 2>/dev/null || true
rm -f "$spec"

# The pod is simulated: record the trainer's exit on it, as the kubelet would.
pod=$(k get pods -n $ns -l llamaops.io/finetune=$run -o jsonpath='{.items[0].metadata.name}')
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
k patch pod -n $ns "$pod" --subresource=status --type=merge -p "{\"status\": {\"phase\": \"Succeeded\",
  \"containerStatuses\": [{\"name\": \"trainer\", \"image\": \"trainer\", \"imageID\": \"\", \"ready\": false,
  \"restartCount\": 0, \"state\": {\"terminated\": {\"exitCode\": 0, \"reason\": \"Completed\",
  \"startedAt\": \"$now\", \"finishedAt\": \"$now\"}}}]}}" >/dev/null
k wait -n $ns --for=jsonpath='{.status.phase}'=Succeeded lft/$run --timeout=60s >/dev/null

say "done"
k get lft -n $ns -o wide
echo
echo "adapter: $(k get lft -n $ns $run -o jsonpath='{.status.adapter.uri}')"
echo "  = $demo/pvc/$ns/adapters/$run/adapter:"
ls "$demo/pvc/$ns/adapters/$run/adapter"
echo
echo "metrics: $demo/pvc/$ns/adapters/$run/metrics.jsonl"
echo "events:  KUBECONFIG=$kubeconfig $bin/kubectl get events -n $ns"
echo "stop:    make cluster-down   (the operator: pkill -f 'llamaops operator')"
