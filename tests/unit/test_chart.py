"""The Helm chart, rendered with the real helm (`helm template`/`helm lint`, no cluster): RBAC from one
source, the operator Deployment, settings it passes, and values the schema refuses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from llamaops import settings
from llamaops.tools import crdgen, rbac

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llamaops"


@pytest.fixture(scope="module")
def helm() -> str:
    """helm from $LLAMAOPS_BIN_DIR, else the cached hack/build-binaries.sh output, else PATH."""
    candidates = []
    if os.environ.get("LLAMAOPS_BIN_DIR"):
        candidates.append(Path(os.environ["LLAMAOPS_BIN_DIR"]) / "helm")
    proc = subprocess.run(["bash", str(REPO / "hack" / "build-binaries.sh"), "--cached"], capture_output=True,
                          text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        candidates.append(Path(proc.stdout.strip().splitlines()[-1]) / "helm")
    found = next((str(c) for c in candidates if os.access(c, os.X_OK)), None) or shutil.which("helm")
    if found is None:
        pytest.skip("no helm: run hack/build-binaries.sh (or set LLAMAOPS_BIN_DIR)")
    return found


def render(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "rel", str(CHART), "--namespace", "llamaops-system", *args],
                          capture_output=True, text=True, check=check, timeout=60)


def objects(helm: str, *args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(helm, *args).stdout) if d]


def one(objs: list[dict[str, Any]], kind: str, namespace: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(found) == 1, (kind, namespace, [o["metadata"]["name"] for o in found])
    return found[0]


def manifests(rules: list[rbac.Rule]) -> list[dict[str, Any]]:
    return [r.manifest() for r in rules]


def test_lint_is_clean(helm: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_generated_files_are_current() -> None:
    """charts/llamaops/crds (crdgen) and files/rbac (llamaops.tools.rbac) are generated: `make chart` refreshes them."""
    assert rbac.main(["--check"]) == 0, "stale chart RBAC rules: run `make chart`"
    chart_crds = CHART / "crds"
    for name, obj in crdgen.render().items():
        assert (chart_crds / name).read_text() == crdgen.dump(obj), f"chart crds/{name} is stale: run `make crds`"
    assert sorted(p.name for p in chart_crds.iterdir()) == sorted(crdgen.render())


def test_operator_deployment(helm: str) -> None:
    objs = objects(helm)
    assert sorted({o["kind"] for o in objs}) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service",
                                                  "ServiceAccount"]
    dep = one(objs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    ctr = pod["containers"][0]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert ctr["image"] == f"ghcr.io/llamaops/operator:{chart['appVersion']}"
    assert "args" not in ctr  # the image's entrypoint is `llamaops operator`
    # The restricted Pod Security profile.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert env["LLAMAOPS_LIVENESS_PORT"] == "8080" and env["LLAMAOPS_METRICS_PORT"] == "9090"
    assert env["LLAMAOPS_QUEUE_MODE"] == "builtin" and env["LLAMAOPS_NAMESPACES"] == ""
    svc = one(objs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def test_every_env_var_the_chart_sets_is_a_setting_with_the_same_default(helm: str) -> None:
    ctr = one(objects(helm), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    source = (REPO / "operator" / "llamaops" / "settings.py").read_text()
    read = set(re.findall(r"\"(LLAMAOPS_[A-Z_]+)\"", source))
    assert set(env) <= read, f"the chart sets variables settings.py never reads: {set(env) - read}"
    from_chart = settings.Settings.from_env(env)
    defaults = settings.Settings()
    for field in ("queue_mode", "kueue_default_queue", "trainer_image", "vllm_image", "ollama_image",
                  "adapter_fetch_image", "image_pull_policy", "backfill_limit", "admission_interval",
                  "model_cache_pvc", "liveness_port", "allowed_images", "allowed_priority_classes", "max_priority",
                  "network_policies", "stuck_after", "node_lost_after"):
        if hasattr(defaults, field):
            assert getattr(from_chart, field) == getattr(defaults, field), field


def test_values_reach_the_pod(helm: str) -> None:
    dep = one(objects(helm, "--set", "queue.mode=kueue", "--set", "watchNamespaces={team-a,team-b}",
                      "--set", "trainer.image=registry.example/trainer:1.2.3", "--set", "priorityClassName=ops",
                      "--set", "nodeSelector.pool=system", "--set", "tolerations[0].key=dedicated",
                      "--set", "tolerations[0].operator=Exists", "--set", "image.digest=sha256:" + "a" * 64,
                      "--set", "verbose=true", "--set", "metrics.enabled=false"), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert env["LLAMAOPS_QUEUE_MODE"] == "kueue" and env["LLAMAOPS_NAMESPACES"] == "team-a,team-b"
    assert env["LLAMAOPS_TRAINER_IMAGE"] == "registry.example/trainer:1.2.3"
    assert env["LLAMAOPS_METRICS_PORT"] == "0"
    assert "LLAMAOPS_DEV_NODE" not in env  # demo mode is off unless asked for
    assert ctr["image"] == "ghcr.io/llamaops/operator@sha256:" + "a" * 64
    assert ctr["args"] == ["--verbose"]
    assert pod["priorityClassName"] == "ops" and pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]


def test_dev_node_value_turns_on_demo_mode(helm: str) -> None:
    ctr = one(objects(helm, "--set", "devNode=local-cpu"), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert settings.Settings.from_env(env).dev_node == "local-cpu"


def test_metrics_service_and_service_monitor(helm: str) -> None:
    kinds = {o["kind"] for o in objects(helm, "--set", "metrics.enabled=false")}
    assert "Service" not in kinds and "ServiceMonitor" not in kinds
    sm = one(objects(helm, "--set", "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_cluster_role_is_the_rule_list_when_all_namespaces_are_managed(helm: str) -> None:
    objs = objects(helm)
    role = one(objs, "ClusterRole")
    assert role["rules"] == manifests(rbac.rules("cluster") + rbac.rules("watch") + rbac.rules("namespaced"))
    assert len(role["rules"]) == len(rbac.RULES)
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(objs, "ServiceAccount")["metadata"]["name"],
                                    "namespace": "llamaops-system"}]
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]


def test_listed_namespaces_get_the_writes_as_roles(helm: str) -> None:
    objs = objects(helm, "--set", "watchNamespaces={team-a,team-b}")
    # The built-in queue watches every namespace (it counts all GPU pods); it writes only in team-a/team-b.
    assert one(objs, "ClusterRole")["rules"] == manifests(rbac.rules("cluster") + rbac.rules("watch"))
    for ns in ("team-a", "team-b"):
        assert one(objs, "Role", ns)["rules"] == manifests(rbac.rules("namespaced"))
        assert one(objs, "RoleBinding", ns)["roleRef"]["kind"] == "Role"


def test_kueue_mode_for_listed_namespaces_watches_only_them(helm: str) -> None:
    objs = objects(helm, "--set", "queue.mode=kueue", "--set", "watchNamespaces={team-a}")
    assert one(objs, "ClusterRole")["rules"] == manifests(rbac.rules("cluster"))
    assert one(objs, "Role", "team-a")["rules"] == manifests(rbac.rules("watch") + rbac.rules("namespaced"))


def test_rules_are_least_privilege() -> None:
    for rule in rbac.RULES:
        assert "*" not in rule.verbs and "*" not in rule.resources and rule.api_group != "*", rule.id
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule.verbs), rule.id
        assert not {"secrets", "customresourcedefinitions", "clusterroles", "clusterrolebindings"} & set(
            rule.resources), rule.id
        assert rule.why and rule.used_by in ("finetune", "serve"), rule.id
        assert rule.scope != "cluster" or rule.resources == ("nodes",), rule.id
    ids = [r.id for r in rbac.RULES]
    assert len(ids) == len(set(ids))
    # The trainer's Role (builders/finetune.py) grants only what the operator holds: RBAC's escalation check.
    from api_cases import example
    from llamaops.api import LlamaFineTune
    from llamaops.builders.finetune import workload
    from llamaops.queue import Placement

    doc = example("llama-3.1-8b-lora.yaml")
    doc["metadata"].update(namespace="team-a", uid="uid-1")
    held = {(g, res, v) for r in rbac.RULES for g in [r.api_group] for res in r.resources for v in r.verbs}
    trainer_role = workload(LlamaFineTune.model_validate(doc), settings.Settings(), Placement()).role
    for rule in trainer_role["rules"]:
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    assert (g, res, v) in held, f"the trainer's Role grants {v} {res}, which the operator lacks"


@pytest.mark.parametrize("values, named", [
    ({"queue": {"mode": "fifo"}}, "/queue/mode"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"queueMode": "kueue"}, "queueMode"),  # a typo of queue.mode: unknown keys are refused
    ({"trainer": {"image": ""}}, "/trainer/image"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"devNode": "Local CPU"}, "/devNode"),
])
def test_schema_refuses_bad_values_naming_them(helm: str, tmp_path: Path, values: dict, named: str) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = render(helm, "-f", str(path), check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr and named in proc.stderr, proc.stderr


def test_schema_is_valid_json_with_descriptions() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert schema["properties"]["queue"]["properties"]["mode"]["enum"] == ["builtin", "kueue"]
