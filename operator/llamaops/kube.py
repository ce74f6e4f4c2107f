"""The one Kubernetes client module of the operator and the CLI (kubernetes_asyncio).

Finding the cluster as kubectl does (`api_client`, `connect`, `current_namespace`),
reading its errors (`describe_api_error`), and `Kube`: everything the handlers
do to the cluster, so the calls (and the permissions they need) are in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from llamaops.api.constants import FIELD_MANAGER, FINETUNES, GROUP, SERVES, VERSION
from llamaops.api.contract import SERVICEACCOUNT_DIR

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
log = logging.getLogger(__name__)

# The pod's own service account. The fixed path, not contract.serviceaccount_dir(): load_incluster_config
# reads its credentials from there whatever LLAMAOPS_SERVICEACCOUNT_DIR says.
_SA_DIR = Path(SERVICEACCOUNT_DIR)


# ---------------------------------------------------------------- finding the cluster


class ClusterError(Exception):
    """The cluster cannot be reached or refused a request (the CLI exits 2 with this message)."""


def _config_file(kubeconfig: str | None) -> str | None:
    value = kubeconfig or os.environ.get("KUBECONFIG") or None
    if value:
        return value
    default = Path("~/.kube/config").expanduser()
    return str(default) if default.is_file() else None


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (_SA_DIR / "token").is_file()


def current_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace kubectl would use: the context's, else the pod's, else "default"."""
    path = _config_file(kubeconfig)
    if path is None:
        if _in_cluster() and (_SA_DIR / "namespace").is_file():
            return (_SA_DIR / "namespace").read_text().strip() or "default"
        return "default"
    try:
        contexts, active = config.list_kube_config_contexts(path)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


async def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """A client for the cluster, found as kubectl finds it: --kubeconfig, else $KUBECONFIG, else
    ~/.kube/config (with `context`, else the current one); inside a pod with none of these, the pod's
    service account. The caller closes it."""
    path = _config_file(kubeconfig)
    try:
        if path is None and _in_cluster():
            config.load_incluster_config()
            return client.ApiClient()
        if path is None:
            raise ClusterError("no kubeconfig: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config "
                               "(`llamaops dev-cluster up` prints one for the local control plane)")
        return await config.new_client_from_config(config_file=path, context=context)
    except config.ConfigException as exc:
        raise ClusterError(f"kubeconfig {path}: {exc}") from None


@contextlib.asynccontextmanager
async def connect(kubeconfig: str | None = None, context: str | None = None) -> AsyncIterator[client.ApiClient]:
    """`api_client`, closed on exit."""
    api = await api_client(kubeconfig, context)
    try:
        yield api
    finally:
        await api.close()


async def raise_for_status(resp: Any) -> None:
    """ApiException for an error status of a call made with _preload_content=False (which does not raise
    by itself), its body read for the message."""
    if resp.status >= 400:
        error = ApiException(status=resp.status, reason=resp.reason)
        error.body = await resp.text()
        raise error


async def raw_json(resp: Any) -> Any:
    """The JSON of a call made with _preload_content=False."""
    await raise_for_status(resp)
    return await resp.json()


def api_message(exc: BaseException) -> str:
    """The message of the Status an ApiException carries in its body ("" when there is none)."""
    try:
        status = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return ""
    return str(status.get("message") or "") if isinstance(status, dict) else ""


def describe_api_error(exc: BaseException) -> str | None:
    """A one-line message for the errors a cluster call can end in, or None for anything else."""
    from aiohttp import ClientError

    if isinstance(exc, ClusterError):
        return str(exc)
    if isinstance(exc, ApiException):
        message = api_message(exc)
        return f"the API server answered {exc.status} {exc.reason}" + (f": {message}" if message else "")
    if isinstance(exc, ClientError | asyncio.TimeoutError | OSError):
        return f"cannot reach the cluster: {exc or type(exc).__name__}"
    return None


# ---------------------------------------------------------------- the operator's calls


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.autoscaling = client.AutoscalingV2Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.requests = 0  # API calls made, for the benchmarks

    def _create_call(self, kind: str):  # noqa: ANN202
        return {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Service": self.core.create_namespaced_service,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
            "Deployment": self.apps.create_namespaced_deployment,
            "PodDisruptionBudget": self.policy.create_namespaced_pod_disruption_budget,
            "HorizontalPodAutoscaler": self.autoscaling.create_namespaced_horizontal_pod_autoscaler,
        }[kind]

    def _patch_call(self, kind: str):  # noqa: ANN202
        return {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "ServiceAccount": self.core.patch_namespaced_service_account,
            "Service": self.core.patch_namespaced_service,
            "Role": self.rbac.patch_namespaced_role,
            "RoleBinding": self.rbac.patch_namespaced_role_binding,
            "Deployment": self.apps.patch_namespaced_deployment,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
            "HorizontalPodAutoscaler": self.autoscaling.patch_namespaced_horizontal_pod_autoscaler,
        }[kind]

    async def _apply(self, manifest: dict[str, Any]) -> Any:
        self.requests += 1
        meta = manifest["metadata"]
        return await self._patch_call(manifest["kind"])(meta["name"], meta["namespace"], manifest,
                                                        field_manager=FIELD_MANAGER, force=True,
                                                        _content_type=APPLY_PATCH)

    async def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply as field manager "llamaops": creates, or brings an existing child to the manifest."""
        await self._apply(manifest)

    async def apply_returning(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """`apply`, returning the object as the server now has it (status included): no extra get."""
        return self.api.sanitize_for_serialization(await self._apply(manifest))

    async def create(self, manifest: dict[str, Any]) -> bool:
        """Create unless it exists (deterministic names make a repeat a no-op). True if created."""
        self.requests += 1
        try:
            await self._create_call(manifest["kind"])(manifest["metadata"]["namespace"], manifest,
                                                      field_manager=FIELD_MANAGER)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    async def get_finetune(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests += 1
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, FINETUNES, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def get_serve(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests += 1
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, SERVES, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a child (ConfigMap, PodDisruptionBudget, HorizontalPodAutoscaler...). True if it was there."""
        self.requests += 1
        call = {
            "ConfigMap": self.core.delete_namespaced_config_map,
            "PodDisruptionBudget": self.policy.delete_namespaced_pod_disruption_budget,
            "HorizontalPodAutoscaler": self.autoscaling.delete_namespaced_horizontal_pod_autoscaler,
        }[kind]
        try:
            await call(name, namespace)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (a vanished object is not an error)."""
        self.requests += 1
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status}, field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a Job and (in the background) its pods. True if it was there."""
        self.requests += 1
        try:
            await self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self.requests += 1
        pods = await self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api.sanitize_for_serialization(p) for p in pods.items]

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about one of our objects; failing to post never fails a reconcile."""
        meta = obj["metadata"]
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "llamaops"}, "reportingComponent": "llamaops",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
        }
        self.requests += 1
        try:
            await self.core.create_namespaced_event(meta["namespace"], body)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not post event %s on %s: %s", reason, meta["name"], exc)

    async def close(self) -> None:
        await self.api.close()
