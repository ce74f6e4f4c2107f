#!/usr/bin/env bash
# `make demo`: LlamaOps' main job on the local control plane, for real.
#
#   1. the local control plane with simulated GPU nodes (llamaops dev-cluster up)
#   2. the dev node `local-cpu` (python -m llamaops_dev.devnode): a Node whose pods run
#      as local processes of this venv; kwok keeps simulating every other node
#   3. the CRDs, a PVC with a tiny Llama and a chat dataset made here, and the
#      operator in demo mode (LLAMAOPS_DEV_NODE=local-cpu: training pods go to the
#      dev node and train on its CPU over gloo, no GPUs requested)
#   4. `kubectl apply -f examples/tiny-llama-cpu.yaml`: validated, queued, admitted,
#      a training Job whose pod the dev node runs: the trainer reads the spec the
#      Job mounts, reports progress into the object's status with the run's own
#      ServiceAccount, and leaves the adapter on the PVC
#   5. the operator marks the run Succeeded with the adapter's location
#   6. `kubectl apply -f examples/tiny-llama-serve.yaml`: a LlamaServe whose Ollama
#      Deployment mounts exactly that adapter; the dev node runs its pod (a real
#      Ollama, built from the Go module proxy by hack/build-ollama.sh) and publishes
#      its Service on 127.0.0.1: Ready
#   7. one chat completion from the adapter and the same question to the base model,
#      through that endpoint (llamaops chat), which stays up for curl
#
# Everything stays up; `hack/demo.sh down` stops the operator, the dev node and the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
err() { printf '\033[1;31mdemo: %s\033[0m\n' "$*" >&2; }
llamaops=.venv/bin/llamaops
python=.venv/bin/python
export LLAMAOPS_HOME=${LLAMAOPS_HOME:-$HOME/.llamaops}
demo=$LLAMAOPS_HOME/demo
ns=llamaops-demo
run=tiny-llama-cpu
node=local-cpu
operator_pid=$demo/operator.pid
devnode_pid=$demo/devnode.pid
liveness_port=${LLAMAOPS_DEMO_LIVENESS_PORT:-16280}
teardown="hack/demo.sh down"
[ "$LLAMAOPS_HOME" = "$HOME/.llamaops" ] || teardown="LLAMAOPS_HOME=$LLAMAOPS_HOME $teardown"

# A pid file's process, if it is still the one we started (pids get reused).
alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "$2"
}

stop_pid() {  # pid file, what its command line contains, name
  if alive "$1" "$2"; then
    local pid
    pid=$(cat "$1")
    echo "stopping the $3 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}

if [ "${1:-}" = down ]; then
  stop_pid "$operator_pid" "llamaops operator" operator
  stop_pid "$devnode_pid" "llamaops_dev.devnode" "dev node agent"
  $llamaops dev-cluster down
  exit 0
fi

# ---------------------------------------------------------------- preflight
if alive "$operator_pid" "llamaops operator" || alive "$devnode_pid" "llamaops_dev.devnode" \
   || $llamaops dev-cluster status >/dev/null 2>&1; then
  err "a previous demo (or dev cluster) is still up under $LLAMAOPS_HOME:"
  $llamaops dev-cluster status 2>&1 | sed 's/^/  /' >&2 || true
  alive "$operator_pid" "llamaops operator" && echo "  operator pid $(cat "$operator_pid")" >&2
  alive "$devnode_pid" "llamaops_dev.devnode" && echo "  dev node agent pid $(cat "$devnode_pid")" >&2
  err "tear it down first:  $teardown"
  exit 1
fi
if $python -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $liveness_port)) != 0)"; then
  err "port $liveness_port (the demo operator's /healthz) is already in use; free it or set LLAMAOPS_DEMO_LIVENESS_PORT"
  exit 1
fi

started=false
on_exit() {
  local rc=$?
  if [ $rc -ne 0 ] && $started; then
    err "the demo stopped (exit $rc); what it started is still up for inspection. Tear down: $teardown"
  fi
}
trap on_exit EXIT

bin=$(hack/build-binaries.sh)
ollama_bin=$(hack/build-ollama.sh)
mkdir -p "$demo"

say "local control plane"
if ! kubeconfig=$(LLAMAOPS_BIN_DIR=$bin $llamaops dev-cluster up 2> >(tee "$demo/cluster-up.log" >&2) | tail -n 1); then
  sleep 0.5  # let tee finish the log
  err "the control plane did not start (see above)."
  if grep -q "already in use" "$demo/cluster-up.log"; then
    err "another dev cluster or demo holds these ports: tear it down (a demo: LLAMAOPS_HOME=<its home>" \
        "hack/demo.sh down; in the default home just: hack/demo.sh down), or run this demo on other ports:" \
        "LLAMAOPS_DEV_CLUSTER_PORT_OFFSET=1000 make demo"
  fi
  exit 1
fi
started=true
export KUBECONFIG=$kubeconfig
k() { "$bin/kubectl" "$@"; }

say "the dev node: pods bound to '$node' run as processes of this venv"
cpus=$(nproc)
[ "$cpus" -lt 2 ] && cpus=2  # the example asks for 2 CPUs; the dev node time-shares them
# The trainer patches status every second (not 5), so the short demo run shows its progress.
# Its pods find `ollama` on PATH (the LlamaServe's pod runs `ollama serve`).
PATH="$ollama_bin:$PATH" LLAMAOPS_PROGRESS_INTERVAL=1 $python -m llamaops_dev.devnode --kubeconfig "$kubeconfig" --name $node --work-dir "$demo/devnode" \
  --cpu "$cpus" > "$demo/devnode.log" 2>&1 &
echo $! > "$devnode_pid"
ready=""
for _ in $(seq 120); do
  ready=$(k get node $node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
  [ "$ready" = True ] && break
  alive "$devnode_pid" "llamaops_dev.devnode" || break
  sleep 0.5
done
if [ "$ready" != True ]; then
  err "the dev node did not become Ready; last lines of $demo/devnode.log:"
  tail -n 20 "$demo/devnode.log" >&2
  exit 1
fi
k get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu,PRODUCT:.metadata.labels.nvidia\.com/gpu\.product,TAINTS:.spec.taints[*].key'
echo "pods' files and logs: $demo/devnode/pods/<namespace>/<pod>/ (agent log: $demo/devnode.log)"

say "CRDs and the seed's recipes, checked offline (the operator runs the same checks)"
k apply --server-side --force-conflicts -f crds/ >/dev/null
k wait --for=condition=Established crd/llamafinetunes.llamaops.io crd/llamaserves.llamaops.io >/dev/null
$llamaops validate -f examples/llama-3.3-70b-qlora.yaml -f examples/llama-3.1-8b-lora.yaml -f examples/llama-3.1-8b-serve.yaml \
  -f examples/tiny-llama-cpu.yaml -f examples/tiny-llama-serve.yaml

say "a tiny Llama and a chat dataset on the demo PVC"
mkdir -p "$demo/pvc/$ns/models" "$demo/pvc/$ns/datasets"
# Made afresh each time (a few seconds; fixed seeds, so the same files unless the generator changed).
$python -m llamaops_trainer.tiny --model-dir "$demo/pvc/$ns/models/tiny-llama" \
  --dataset "$demo/pvc/$ns/datasets/chat.jsonl"
k get namespace $ns >/dev/null 2>&1 || k create namespace $ns >/dev/null
# A hostPath volume: the dev node uses that directory as the claim, as a kubelet would mount it.
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
echo "claim $ns = $demo/pvc/$ns"

say "the operator, in demo mode (LLAMAOPS_DEV_NODE=$node)"
LLAMAOPS_DEV_NODE=$node LLAMAOPS_LIVENESS_PORT=$liveness_port $llamaops operator > "$demo/operator.log" 2>&1 &
echo $! > "$operator_pid"
for _ in $(seq 120); do
  $python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$liveness_port/healthz', timeout=1)" \
    2>/dev/null && break
  alive "$operator_pid" "llamaops operator" || { err "the operator exited:"; tail -n 20 "$demo/operator.log" >&2; exit 1; }
  sleep 0.5
done
echo "log: $demo/operator.log"

say "kubectl apply -f examples/tiny-llama-cpu.yaml"
k delete lsv -n $ns tiny-llama --ignore-not-found --wait=true >/dev/null
k delete lft -n $ns $run --ignore-not-found --wait=true >/dev/null
rm -rf "$demo/pvc/$ns/adapters/$run"
k apply -n $ns -f examples/tiny-llama-cpu.yaml

say "training on the dev node (llamaops watch $run: a line per change)"
# Exits 0 when the run Succeeded, 1 when it Failed, 3 when still running after 10 minutes.
watched=0
$llamaops watch -n $ns $run --no-live --timeout 600 || watched=$?
if [ $watched -ne 0 ]; then
  phase=$(k get lft -n $ns $run -o jsonpath='{.status.phase}' 2>/dev/null || true)
  if [ "$phase" = Failed ]; then
    err "the run Failed: $(k get lft -n $ns $run -o jsonpath='{.status.conditions[?(@.type=="Failed")].message}' 2>/dev/null)"
  elif [ $watched -eq 3 ]; then
    err "the run is still ${phase:-not started} after 10 minutes (operator log: $demo/operator.log)"
  else
    err "llamaops watch exited $watched; the run is ${phase:-not started} (operator log: $demo/operator.log)"
  fi
  for pod in $(k get pods -n $ns -l llamaops.io/finetune=$run -o jsonpath='{.items[*].metadata.name}'); do
    podphase=$(k get pod -n $ns "$pod" -o jsonpath='{.status.phase}')
    log=$demo/devnode/pods/$ns/$pod/trainer.log
    echo "--- pod $pod ($podphase), last lines of $log:" >&2
    tail -n 30 "$log" >&2 2>/dev/null || echo "  (no log: the pod never started)" >&2
  done
  exit 1
fi

# ------------------------------------------------------------------ serving
say "kubectl apply -f examples/tiny-llama-serve.yaml (Ollama serving the adapter, a process on the dev node)"
serve=tiny-llama
k delete lsv -n $ns $serve --ignore-not-found --wait=true >/dev/null
k apply -n $ns -f examples/tiny-llama-serve.yaml
sphase=""
for _ in $(seq 360); do  # up to 3 minutes
  sphase=$(k get lsv -n $ns $serve -o jsonpath='{.status.phase}' 2>/dev/null || true)
  case $sphase in Ready|Failed) break ;; esac
  sleep 0.5
done
if [ "$sphase" != Ready ]; then
  err "the LlamaServe is ${sphase:-not reconciled}: $(k get lsv -n $ns $serve -o jsonpath='{.status.conditions[?(@.status=="False")].message}' 2>/dev/null)"
  echo "operator log: $demo/operator.log" >&2
  for pod in $(k get pods -n $ns -l llamaops.io/serve=$serve -o jsonpath='{.items[*].metadata.name}'); do
    echo "--- pod $pod, last lines of $demo/devnode/pods/$ns/$pod/server.log:" >&2
    tail -n 20 "$demo/devnode/pods/$ns/$pod/server.log" >&2 2>/dev/null || true
  done
  exit 1
fi
local_endpoint=""
for _ in $(seq 20); do  # the dev node publishes the Service on 127.0.0.1 within a second or two
  local_endpoint=$(k get svc -n $ns $serve -o jsonpath='{.metadata.annotations.llamaops\.io/local-endpoint}' 2>/dev/null || true)
  [ -n "$local_endpoint" ] && break
  sleep 0.5
done
[ -n "$local_endpoint" ] || { err "the dev node did not publish Service $serve on 127.0.0.1 (see $demo/devnode.log)"; exit 1; }

say "asking it (llamaops chat $serve): the adapter, then the base model"
question="what colour does alice like?"
echo "Q: $question"
for who in adapter base; do
  model=()
  [ $who = adapter ] && model=(--adapter k8s-tiny)
  answer=$($llamaops chat -n $ns $serve "${model[@]}" --no-stream --max-tokens 24 "$question" 2>"$demo/chat.err") \
    || { err "llamaops chat $serve ${model[*]} failed:"; cat "$demo/chat.err" >&2; exit 1; }
  label="A (base model):"
  [ $who = adapter ] && label="A (adapter k8s-tiny):"
  printf '%-22s %s\n' "$label" "$answer"
done

say "done"
k get lft,lsv -n $ns -o wide
pod=$(k get pods -n $ns -l llamaops.io/finetune=$run -o jsonpath='{.items[0].metadata.name}')
out=$demo/pvc/$ns/adapters/$run
echo
echo "adapter: $(k get lft -n $ns $run -o jsonpath='{.status.adapter.uri}')"
echo "  = $out/adapter:"
ls "$out/adapter" | sed 's/^/    /'
echo "served:  $(k get lsv -n $ns $serve -o jsonpath='{.status.endpoint}') as model k8s-tiny (in the cluster)"
echo "endpoint (local): http://$local_endpoint/v1"
echo "  curl http://$local_endpoint/v1/chat/completions -d '{\"model\": \"k8s-tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"$question\"}]}'"
echo "  KUBECONFIG=$kubeconfig $llamaops chat -n $ns $serve --adapter k8s-tiny \"what colour does bob like?\""
echo "metrics: $out/metrics.jsonl"
echo "trainer: $demo/devnode/pods/$ns/$pod/trainer.log"
echo "events:  KUBECONFIG=$kubeconfig $bin/kubectl get events -n $ns"
echo "stop:    $teardown   (operator, dev node and cluster)"
