"""A development node whose pods run as local processes (dev and test tooling, never imported by the operator).

    python -m llamaops_dev.devnode --kubeconfig K --name local-cpu --work-dir D

The agent registers a Node (label and NoSchedule taint `llamaops.io/dev-node=true`,
so only pods that tolerate it land there; kwok manages nodes by annotation and
leaves this one alone), renews its Lease, and runs each container of each pod
bound to it as a local process, reporting the pod's status back as a kubelet
would. The image is ignored: the local environment (this venv) provides the code,
and `python` means this interpreter.

How a pod's view of the filesystem is reproduced without root (no chroot, no
mount namespace): each pod gets `<work>/pods/<namespace>/<pod>/` with

    volumes/<volume>/   ConfigMap, Secret, projected (ServiceAccount token via
                        TokenRequest for the pod's own ServiceAccount, bound to the
                        pod), downwardAPI as files; emptyDir as a directory.
                        PersistentVolumeClaims are not copied: a claim bound to a
                        hostPath/local PV is that path (as a kubelet would mount
                        it), any other claim is <pvc-dir>/<namespace>/<claim>.
    root/<mountPath>    a symlink per volumeMount (subPath honoured), so root/
                        mirrors the paths the container expects.
    <container>.log     stdout and stderr; <container>.json the argv and env names run.

and absolute container paths are translated, not faked: an argument or env value
that lies under a mountPath (`--spec /etc/llamaops/spec.yaml`, HF_HOME=...) is
rewritten to the same path under root/. Code with built-in absolute paths reads
the contract's overrides, which the agent sets: LLAMAOPS_PVC_ROOT (claims),
LLAMAOPS_SERVICEACCOUNT_DIR (the in-cluster token, ca.crt and namespace) and
LLAMAOPS_TERMINATION_LOG (terminationMessagePath); TMPDIR and HOME are per pod.

Networking: cluster DNS names of
the pod's namespace (`<host>.<subdomain>`, `<service>`, `...<ns>.svc.cluster.local`)
in arguments and env values are rewritten to 127.0.0.1, an /etc/hosts-style
mapping without touching /etc/hosts, so torchrun's rendezvous through the
headless Service reaches rank 0 here (a bare Service name only with a port: an
argument that merely equals one is not an address). Programs that bind the
wildcard address in code (torchrun's store) bind it for the whole machine: two
multi-node runs using the same rendezvous port at once would clash.
KUBERNETES_SERVICE_HOST/PORT point at the API server of the kubeconfig.

Status: phase Pending -> Running -> Succeeded/Failed, containerStatuses (running,
terminated with exit code, reason and the terminationMessagePath file, else with
FallbackToLogsOnError the log's tail), conditions, podIP. restartPolicy Never,
OnFailure and Always (with back-off); init containers run in order first.
Probes: startupProbe gates readiness and liveness; Ready follows readinessProbe;
a failed startup or liveness probe restarts the container (exec, httpGet,
tcpSocket; against the podIP). A deleted pod's containers run their preStop hook
(exec, httpGet, sleep), then their main process gets SIGTERM (only it, as a
runtime signals PID 1) and their whole process group SIGKILL after the grace
period; then the agent deletes the pod with grace 0, as a kubelet does. Stopping the agent
stops its pods' processes (the Node stays, and goes NotReady when its Lease
lapses); pods an earlier agent started are marked Failed.

Mounts: run as root (or with CAP_SYS_ADMIN), each container runs in a mount
namespace of its own where root/<mountPath> are bind mounts of its volumes
(readOnly honoured), so what resolves symlinks sees real directories; otherwise
they are symlinks (the record's `mounts` says where each one's data is).

Networking, besides the names above: each pod has a loopback IP of its own
(127.77.x.y, its podIP; the wildcard address in its arguments and env is
rewritten to it), so replicas can bind the same port; its Services are published
on 127.0.0.1 (llamaops_dev.devnode.services).

Not reproduced: images, securityContext (processes run as the agent's user),
resource limits, network isolation, `kubectl logs/exec` (logs are files, and
each container's Started event names its log).
"""

from llamaops.api.constants import DEV_NODE_LABEL as NODE_LABEL  # the operator tolerates it in demo mode

NODE_TAINT = {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}
