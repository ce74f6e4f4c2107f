"""RBAC proof: the chart's permissions are enough, and each of them is needed.

The chart is installed; the operator runs locally (as in the other cluster tests) but logs in
with a token of the chart's ServiceAccount (TokenRequest API) instead of the admin credential,
and must take every happy path of HAPPY_PATHS: a fine-tune Queued -> Admitted -> Job -> Succeeded
with its events posted, and a LlamaServe of a run's adapter from WaitingForAdapters to Ready with
every optional child, an edit that drops them and its deletion. Then, for every rule of the
chart's ClusterRole, the happy path of that rule (its `used_by`) runs with that one rule removed
and must fail within a bounded time, the operator's log showing the API server refusing it.

The removals run side by side, each in its own namespace with its own ServiceAccount bound to
its own copy of the installed ClusterRole less one rule (the same as patching the ClusterRole,
one rule at a time, but all at once instead of one after another).

Happy paths are listed in HAPPY_PATHS, keyed by the `used_by` of the rules (llamaops/tools/rbac.py)
they prove: rules of a feature with no happy path here are skipped, saying so.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cases import example
from llamaops.tools import rbac
from operator_fixtures import Cluster, OperatorProcess, gpu_pods_gone, install_crds
from test_helm import CHART, Helm, helm_binary

pytestmark = pytest.mark.cluster

# Seconds from the operator being up (its start, under the load of all cases starting at once, takes 20-25s
# on 2 cores and is bounded by OperatorProcess.start) to the end of the case's happy paths.
HAPPY_TIMEOUT = 150.0  # every happy path, with every rule
# The happy path of a rule, with that rule removed, to (wrongly) succeed; each happy path with every rule must take
# well under it (checked). 90 s: some 30 operators start and work at once on 2 cores (the finetune path took 40 s).
BROKEN_TIMEOUT = 90.0


class HappyPathFailed(Exception):
    pass


@dataclass
class Case:
    """One operator process with one identity, driving happy paths in its own namespace."""

    key: str  # "full" or a rule id
    paths: tuple[str, ...]  # the HAPPY_PATHS it runs, in order
    namespace: str
    kubeconfig: Path
    log: Path
    error: str | None = None
    elapsed: float = 0.0
    log_tail: str = ""
    took: dict[str, float] = field(default_factory=dict)  # seconds each happy path took, the operator's start too


def _poll(check: Callable[[], Any], what: Callable[[], str], deadline: float, interval: float = 1.0) -> Any:
    """Poll (gently: many cases share a few CPUs) until `check` holds; HappyPathFailed at the deadline."""
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HappyPathFailed(f"timed out waiting for {what()}")
        time.sleep(interval)


def _expect(ok: bool, what: Callable[[], str]) -> None:
    if not ok:
        raise HappyPathFailed(f"expected {what()}")


def finetune_happy_path(c: Cluster, deadline: float) -> None:
    """A 1-GPU LlamaFineTune from apply to Succeeded, its trainer's progress reaching the status on the way (the
    report ConfigMap, written here as the trainer would), with the operator's events."""
    c.run("happy", gpus=1)
    def phase() -> str:
        return f"phase {c.status('happy').get('phase')}"

    _poll(lambda: c.status("happy").get("phase") == "Running", lambda: f"Running ({phase()})", deadline)
    _poll(lambda: c.job("happy"), lambda: "the training Job", deadline)
    progress = {"step": 3, "totalSteps": 10, "display": "3/10", "loss": 2.5}
    c.kubectl("patch", "configmap", "-n", c.ns, "happy-report", "--type=merge", "-p",
              json.dumps({"data": {"progress": json.dumps(progress)}}))
    _poll(lambda: c.status("happy").get("progress") == progress,
          lambda: f"the reported progress in the status (got {c.status('happy').get('progress')})", deadline)
    _poll(lambda: [p for p in c.pods("happy") if p["status"].get("phase") == "Running"], lambda: "a running pod",
          deadline)
    c.finish_pods("happy")
    _poll(lambda: c.status("happy").get("phase") == "Succeeded", lambda: f"Succeeded ({phase()})", deadline)
    reasons = lambda: {e["reason"] for e in c.events("happy")}  # noqa: E731
    _poll(lambda: {"Queued", "Admitted", "Succeeded"} <= reasons(), lambda: f"the run's events (got {reasons()})",
          deadline)


def serve_happy_path(c: Cluster, deadline: float) -> None:
    """A LlamaServe of a run's adapter, with every optional child: waits for the run, goes Ready, an edit drops
    the optional children again, and deleting it takes the rest.

    The run does not train (the fine-tune happy path proves that, and the removal cases of the serve rules
    would queue for GPUs behind it): it is created suspended, which the operator only records, and then given
    the status the operator writes when training succeeds (status subresource, admin credential), adapter and
    the example's systemPrompt included, hence a chat-template ConfigMap. What each step needs:
    - WaitingForAdapters: the LlamaServe watch, get and status patch, reading the run, events;
    - the run succeeding: the watch of runs and the index of serves by run (handlers/serve.py run_changed);
    - Ready: server-side apply of the ConfigMap, Service, Deployment, PodDisruptionBudget and
      HorizontalPodAutoscaler, delete of the other runtime's ConfigMap (absent: RBAC refuses before the 404),
      and the Deployment watch (readiness reaches the status only through it: nothing re-reads the Deployment);
    - the edit: delete of the chat-template ConfigMap, the PodDisruptionBudget and the HorizontalPodAutoscaler;
    - the deletion: nothing of the operator's (owner references), which must not put anything back.
    """
    run = c.run(SERVED_RUN, suspend=True)
    _poll(lambda: c.status(SERVED_RUN).get("phase") == "Suspended",
          lambda: f"run {SERVED_RUN} Suspended (phase {c.status(SERVED_RUN).get('phase')})", deadline)
    doc = example("llama-3.1-8b-serve.yaml")
    doc["metadata"] = {"name": SERVE}
    doc["spec"].pop("hfTokenSecretRef", None)
    doc["spec"].update(
        adapters=[{"name": "k8s-assistant", "fineTuneRef": SERVED_RUN}],
        podDisruptionBudget={"maxUnavailable": 1},
        autoscaling={"minReplicas": 1, "maxReplicas": 2, "targetCPUUtilization": 80},
        # Many cases share 16 simulated GPUs: the edit's rollout replaces the one replica instead of adding one.
        rollingUpdate={"maxSurge": 0, "maxUnavailable": 1},
    )
    c.apply(doc)
    status = lambda: (c.get("lsv", SERVE) or {}).get("status") or {}  # noqa: E731

    def state() -> str:
        s = status()
        return f"phase {s.get('phase')}, {s.get('readyReplicas')} ready, generation {s.get('observedGeneration')}"

    def ready(generation: int) -> Callable[[], bool]:
        return lambda: (status().get("phase") == "Ready" and status().get("readyReplicas") == 1
                        and status().get("observedGeneration") == generation)

    def present(kinds: dict[str, str]) -> dict[str, bool]:
        return {kind: bool(c.get(kind, name)) for kind, name in kinds.items()}

    _poll(lambda: status().get("phase") == "WaitingForAdapters", lambda: f"WaitingForAdapters ({state()})",
          deadline)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    spec = run["spec"]
    c.kubectl("patch", "-n", c.ns, "lft", SERVED_RUN, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"phase": "Succeeded", "completionTime": now, "adapter": {
            "uri": f"pvc://adapters/{c.ns}/{SERVED_RUN}/adapter", "baseModel": spec["model"]["base_model"],
            "r": spec["lora"]["r"], "systemPrompt": spec["systemPrompt"]}}}))
    _poll(ready(1), lambda: f"LlamaServe {SERVE} Ready ({state()})", deadline)
    _expect(status().get("adapterNames") == "k8s-assistant", lambda: f"the run's adapter served ({status()})")
    children = {"deployment": SERVE, "service": SERVE, "configmap": f"{SERVE}-chat-template", "pdb": SERVE,
                "hpa": SERVE}
    _poll(lambda: all(present(children).values()), lambda: f"the children ({present(children)})", deadline)
    reasons = lambda: {e["reason"] for e in c.events(SERVE)}  # noqa: E731
    _poll(lambda: {"WaitingForAdapters", "Deploying", "Ready"} <= reasons(),
          lambda: f"the serve's events (got {reasons()})", deadline)

    # An edit that drops the adapter (so its chat template), the budget and the autoscaler.
    c.kubectl("patch", "-n", c.ns, "lsv", SERVE, "--type=json", "-p", json.dumps([
        {"op": "remove", "path": f"/spec/{key}"} for key in ("adapters", "podDisruptionBudget", "autoscaling")]))
    dropped = {k: n for k, n in children.items() if k in ("configmap", "pdb", "hpa")}
    _poll(lambda: not any(present(dropped).values()), lambda: f"the dropped children to go ({present(dropped)})",
          deadline)
    _poll(ready(2), lambda: f"LlamaServe {SERVE} Ready after the edit ({state()})", deadline)
    _expect(not status().get("adapterNames"), lambda: f"no adapter served after the edit ({status()})")

    # Deleting it: owner references take the rest, and the operator puts nothing back.
    c.kubectl("delete", "-n", c.ns, "lsv", SERVE, "--wait=true", "--timeout=30s")
    _poll(lambda: not any(present(children).values()), lambda: f"the children to be collected ({present(children)})",
          deadline)
    time.sleep(1)
    _expect(not any(present(children).values()), lambda: f"nothing put back ({present(children)})")


SERVE, SERVED_RUN = "happy-serve", "served"

# The full case runs them all, in this order; a case less one rule runs the happy path of that rule's `used_by`.
HAPPY_PATHS: dict[str, Callable[[Cluster, float], None]] = {
    "finetune": finetune_happy_path,
    "serve": serve_happy_path,
}


# ----------------------------------------------------------------------------------------------- plumbing


def _core(k8s: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(k8s)


def token_for(k8s: Any, namespace: str, account: str) -> str:
    """A short-lived token of a ServiceAccount, from the TokenRequest API."""
    resp = _core(k8s).create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}})
    return resp.status.token


def kubeconfig_with_token(admin: Path, token: str, path: Path) -> Path:
    """The admin kubeconfig's cluster (server, CA), with the token as the only credential."""
    cfg = yaml.safe_load(admin.read_text())
    context = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])["context"]
    cluster = next(c for c in cfg["clusters"] if c["name"] == context["cluster"])
    cluster_cfg = dict(cluster["cluster"])
    ca = cluster_cfg.get("certificate-authority")
    if ca and not Path(ca).is_absolute():
        cluster_cfg["certificate-authority"] = str((admin.parent / ca).resolve())
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": cluster_cfg}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }))
    return path


def run_case(case: Case, kubectl: Any, tmp: Path, timeout: float) -> Case:
    """Start the operator with the case's identity, run its happy paths, stop it; the outcome lands in case."""
    c = Cluster(kubectl, case.namespace, tmp / case.namespace)
    c.volumes("training-data", "adapters")
    proc = OperatorProcess(case.kubeconfig, case.log, {"LLAMAOPS_NAMESPACES": case.namespace,
                                                      "LLAMAOPS_ADMISSION_INTERVAL": "1"})
    start = time.monotonic()
    try:
        try:
            proc.start()
        except pytest.fail.Exception as exc:  # its liveness never answered
            raise HappyPathFailed(f"the operator did not start: {str(exc).splitlines()[0]}") from None
        case.took["start"] = time.monotonic() - start
        deadline = time.monotonic() + timeout
        for path in case.paths:
            began = time.monotonic()
            HAPPY_PATHS[path](c, deadline)
            case.took[path] = time.monotonic() - began
    except (HappyPathFailed, pytest.fail.Exception) as exc:
        case.error = str(exc).splitlines()[0]
    finally:
        case.elapsed = time.monotonic() - start
        case.log_tail = proc.tail(40)
        proc.stop(kill=True)
    return case


def _fresh_namespace(kubectl: Any, prefix: str) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, "llamaops.dev/test=true")
    return name


@dataclass
class Proof:
    chart_namespace: str
    account: str
    cluster_role: str
    rules: list[dict[str, Any]]
    full: Case
    removed: dict[str, Case]


@pytest.fixture(scope="module")
def proof(cluster, kubectl, k8s, tmp_path_factory) -> Iterator[Proof]:
    install_crds(kubectl, CHART / "crds")  # both: the serve happy path needs llamaserves served from the start
    gpu_pods_gone(kubectl)
    tmp = tmp_path_factory.mktemp("rbac")
    helm = Helm(helm_binary(cluster), cluster.kubeconfig, tmp / "helm")
    release, chart_ns = f"rbac-{secrets.token_hex(3)}", _fresh_namespace(kubectl, "rbac-chart")
    helm.install(release, chart_ns, "--skip-crds", "--set", "metrics.enabled=false")
    full_name = f"{release}-llamaops"
    installed = json.loads(kubectl("get", "clusterrole", full_name, "-o", "json").stdout)
    rules = installed["rules"]
    # The proof is about the rules the chart installed; those are the operator package's list.
    assert rules == [r.manifest() for r in rbac.rules("cluster") + rbac.rules("watch") + rbac.rules("namespaced")]

    # The full ServiceAccount of the chart, and one copy less one rule per rule that a happy path can prove.
    cases: list[Case] = []
    ns = _fresh_namespace(kubectl, "rbac-full")
    token = token_for(k8s, chart_ns, full_name)
    cases.append(Case("full", tuple(HAPPY_PATHS), ns,
                      kubeconfig_with_token(cluster.kubeconfig, token, tmp / "full.kubeconfig"), tmp / "full.log"))
    provable = [r for r in rbac.RULES if r.used_by in HAPPY_PATHS]
    created: list[tuple[str, str]] = []
    for i, rule in enumerate(provable):
        name = f"{release}-minus-{i}"
        less = [r for r in rules if r != rule.manifest()]
        assert len(less) == len(rules) - 1, rule.id
        kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": chart_ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
             "rules": less},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": chart_ns}]},
        ]))
        created += [("clusterrole", name), ("clusterrolebinding", name)]
        case_ns = _fresh_namespace(kubectl, f"rbac-minus-{i}")
        cases.append(Case(rule.id, (rule.used_by,), case_ns, kubeconfig_with_token(
            cluster.kubeconfig, token_for(k8s, chart_ns, name), tmp / f"minus-{i}.kubeconfig"), tmp / f"minus-{i}.log"))

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = [pool.submit(run_case, case, kubectl, tmp,
                               HAPPY_TIMEOUT if case.key == "full" else BROKEN_TIMEOUT) for case in cases]
        done = [f.result() for f in futures]
    for case in done:  # shown with -s, and in a failing test's captured output
        took = ", ".join(f"{k} {v:.1f}s" for k, v in case.took.items())
        print(f"rbac proof: {case.key:60} {case.elapsed:5.1f}s {case.error or 'happy paths succeeded'} ({took})")
    yield Proof(chart_ns, full_name, full_name, rules, done[0], {c.key: c for c in done[1:]})

    helm("uninstall", release, "--namespace", chart_ns, check=False)
    for kind, name in created:
        kubectl("delete", kind, name, "--wait=false", check=False)
    # Cases that broke the Job watch leave running training pods whose Job-tracking finalizer nobody
    # removes once the namespace goes; release them, or the next module waits on their GPUs.
    for case in done:
        kubectl("delete", "lsv,lft", "--all", "-n", case.namespace, "--wait=false", check=False)
        pods = json.loads(kubectl("get", "pods", "-n", case.namespace, "-o", "json").stdout)["items"]
        for pod in pods:
            if pod["metadata"].get("finalizers"):
                kubectl("patch", "pod", pod["metadata"]["name"], "-n", case.namespace, "--type=merge",
                        "-p", '{"metadata":{"finalizers":null}}', check=False)
    for case in done:
        kubectl("delete", "namespace", case.namespace, "--wait=false", check=False)
        kubectl("delete", "pv", "-l", f"llamaops.dev/test-ns={case.namespace}", "--wait=false", check=False)
    kubectl("delete", "namespace", chart_ns, "--wait=false", check=False)


def test_the_charts_service_account_runs_the_happy_paths(proof: Proof) -> None:
    full = proof.full
    assert full.error is None, f"{full.error} after {full.elapsed:.0f}s\n--- operator log ---\n{full.log_tail}"
    # Nothing it tried was refused (a refused event post, say, would not fail a happy path).
    refused = [line for line in full.log.read_text(errors="replace").splitlines() if "forbidden" in line.lower()]
    assert not refused, "\n".join(refused[:10])
    # Each happy path fits well in the time a removal case gets: their failing is not mere slowness.
    slow = {path: round(took) for path, took in full.took.items() if path != "start" and took > BROKEN_TIMEOUT / 1.5}
    assert not slow, f"happy paths too slow for BROKEN_TIMEOUT={BROKEN_TIMEOUT:.0f}s to mean anything: {slow}"


@pytest.mark.parametrize("rule", rbac.RULES, ids=lambda r: r.id)
def test_every_rule_is_needed(proof: Proof, rule: rbac.Rule) -> None:
    if rule.used_by not in HAPPY_PATHS:
        pytest.skip(f"needed by the {rule.used_by} happy path, which this proof does not run yet")
    case = proof.removed[rule.id]
    assert case.error is not None, (
        f"the happy paths succeeded without {rule.id} ({rule.why}) in {case.elapsed:.0f}s: the rule is not needed"
        f"\n--- operator log ---\n{case.log_tail}")
    # And it failed for that reason, not for being slow: the API server refused one of the rule's requests.
    log = case.log.read_text(errors="replace")
    refused = [f"{v} {res}" for v in rule.verbs for res in rule.resources
               if re.search(rf'cannot {v} resource \\?"{re.escape(res)}\\?"', log)]
    assert refused, f"{case.error}, but the operator's log shows no refused {rule.id}\n{case.log_tail}"


def _allowed(k8s_api: Any, verb: str, resource: str, namespace: str = "", group: str = "",
             subresource: str = "") -> bool:
    from kubernetes import client

    review = client.AuthorizationV1Api(k8s_api).create_self_subject_access_review({
        "spec": {"resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace,
                                        "group": group, "subresource": subresource}}})
    return bool(review.status.allowed)


def test_the_service_account_cannot_read_secrets_or_escalate(proof: Proof) -> None:
    from kubernetes import config as kube_config

    api = kube_config.new_client_from_config(config_file=str(proof.full.kubeconfig))
    try:
        # What it needs, so the reviews are answered for the right identity.
        assert _allowed(api, "list", "nodes")
        assert _allowed(api, "create", "jobs", "team-a", group="batch")
        assert _allowed(api, "patch", "llamafinetunes", "team-a", group="llamaops.io", subresource="status")
        # Secrets: nowhere, in no way (the trainer and vLLM get theirs through secretKeyRef in their pods).
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
            assert not _allowed(api, verb, "secrets"), verb
            assert not _allowed(api, verb, "secrets", proof.chart_namespace), verb
            assert not _allowed(api, verb, "secrets", "team-a"), verb
        # No way around RBAC: no escalate/bind, no cluster roles, no impersonation, no exec into pods.
        assert not _allowed(api, "escalate", "roles", "team-a", group="rbac.authorization.k8s.io")
        assert not _allowed(api, "bind", "roles", "team-a", group="rbac.authorization.k8s.io")
        assert not _allowed(api, "create", "clusterroles", group="rbac.authorization.k8s.io")
        assert not _allowed(api, "create", "clusterrolebindings", group="rbac.authorization.k8s.io")
        assert not _allowed(api, "impersonate", "serviceaccounts", "team-a")
        assert not _allowed(api, "create", "pods", "team-a", subresource="exec")
        assert not _allowed(api, "create", "pods", "team-a")
        assert not _allowed(api, "update", "llamafinetunes", "team-a", group="llamaops.io")
        assert not _allowed(api, "patch", "llamafinetunes", "team-a", group="llamaops.io")
        assert not _allowed(api, "delete", "llamafinetunes", "team-a", group="llamaops.io")
        assert not _allowed(api, "list", "customresourcedefinitions", group="apiextensions.k8s.io")
    finally:
        api.close()
