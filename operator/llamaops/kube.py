"""The operator's one small Kubernetes client module (kubernetes_asyncio).

Everything the handlers do to the cluster goes through here, so the calls
(and the permissions they need) are in one place.
"""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

GROUP, VERSION = "llamaops.io", "v1alpha1"
FINETUNES, SERVES = "llamafinetunes", "llamaserves"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "llamaops"
log = logging.getLogger(__name__)


async def connect() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else $KUBECONFIG / ~/.kube/config, like kubectl."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


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
