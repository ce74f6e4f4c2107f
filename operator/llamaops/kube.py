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


class Stale(Exception):
    """The object changed since it was read: the decision made from it is not written (read again)."""


class NotOwned(Exception):
    """A child's name is taken by an object the run (or serve) does not control: it is never adopted."""

    def __init__(self, obj: dict[str, Any], owner: str) -> None:
        meta = obj["metadata"]
        holder = next((f"{r.get('kind')} {r.get('name')}" for r in meta.get("ownerReferences") or []
                       if r.get("controller")), None)
        super().__init__(f"{obj.get('kind')} {meta.get('namespace')}/{meta.get('name')} exists and is "
                         f"{'controlled by ' + holder if holder else 'not controlled by anything'}, not by {owner}: "
                         "delete or rename it (LlamaOps never takes over objects it did not create)")
        self.obj = obj


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller (its owner reference with controller: true)."""
    return next((r.get("uid") for r in (obj.get("metadata") or {}).get("ownerReferences") or []
                 if r.get("controller")), None)


def _owner(manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    return next((f"{r['kind']} {r['name']}" for r in meta.get("ownerReferences") or [] if r.get("controller")), "?")


class Kube:
    # The kinds of children, and the API groups' calls for them: read, create, patch, delete.
    _KINDS = {
        "ConfigMap": ("core", "config_map"),
        "ServiceAccount": ("core", "service_account"),
        "Service": ("core", "service"),
        "Role": ("rbac", "role"),
        "RoleBinding": ("rbac", "role_binding"),
        "Job": ("batch", "job"),
        "Deployment": ("apps", "deployment"),
        "PodDisruptionBudget": ("policy", "pod_disruption_budget"),
        "HorizontalPodAutoscaler": ("autoscaling", "horizontal_pod_autoscaler"),
        "NetworkPolicy": ("networking", "network_policy"),
    }

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.autoscaling = client.AutoscalingV2Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.requests = 0  # API calls made, for the benchmarks

    def _call(self, verb: str, kind: str):  # noqa: ANN202
        group, name = self._KINDS[kind]
        return getattr(getattr(self, group), f"{verb}_namespaced_{name}")

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A child as the server has it, or None."""
        self.requests += 1
        try:
            return self.api.sanitize_for_serialization(await self._call("read", kind)(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def _owned(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """The existing object of the manifest's name; NotOwned when its controller is not the manifest's."""
        meta = manifest["metadata"]
        existing = await self.get(manifest["kind"], meta["namespace"], meta["name"])
        if existing is not None and controller_uid(existing) != controller_uid(manifest):
            raise NotOwned({"kind": manifest["kind"], **existing}, _owner(manifest))
        return existing

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as field manager "llamaops": creates the child, or brings the one its owner controls
        to the manifest; returns the object as the server now has it (status included). An object of that name
        that the owner does not control is left alone: NotOwned."""
        await self._owned(manifest)
        self.requests += 1
        meta = manifest["metadata"]
        out = await self._call("patch", manifest["kind"])(meta["name"], meta["namespace"], manifest,
                                                         field_manager=FIELD_MANAGER, force=True,
                                                         _content_type=APPLY_PATCH)
        return self.api.sanitize_for_serialization(out)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create it; None when created, else the object already there (deterministic names make a repeat a
        no-op; the caller checks it is the one it means). NotOwned when its owner does not control that one."""
        self.requests += 1
        try:
            await self._call("create", manifest["kind"])(manifest["metadata"]["namespace"], manifest,
                                                        field_manager=FIELD_MANAGER)
            return None
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = await self._owned(manifest)
        if existing is None:  # gone meanwhile
            return await self.create(manifest)
        return existing

    async def delete_owned(self, kind: str, namespace: str, name: str, owner_uid: str | None) -> bool:
        """Delete a child if `owner_uid` controls it (its pods in the background); an object of that name that
        it does not control is left alone. True if it was deleted."""
        existing = await self.get(kind, namespace, name)
        if existing is None:
            return False
        if controller_uid(existing) != owner_uid:
            log.warning("not deleting %s %s/%s: its controller is not the object being reconciled",
                        kind, namespace, name)
            return False
        self.requests += 1
        body = {"preconditions": {"uid": existing["metadata"]["uid"]}, "propagationPolicy": "Background"}
        try:
            await self._call("delete", kind)(name, namespace, body=body)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or replaced meanwhile (the precondition failed)
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

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None = None) -> None:
        """Merge-patch the status subresource (a vanished object is not an error).

        With `resource_version`, only the object of that version is patched (optimistic concurrency): a
        decision made from what was read is not written over a change made since, which raises Stale.
        """
        self.requests += 1
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, body, field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 409 and resource_version:
                raise Stale(f"{plural} {namespace}/{name} changed since version {resource_version}") from None
            if exc.status != 404:
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
