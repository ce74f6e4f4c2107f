"""The dev node's Kubernetes calls (the synchronous `kubernetes` client), all returning plain dicts."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from llamaops_dev.devnode.node import LEASE_NAMESPACE

log = logging.getLogger(__name__)
SMP = "application/strategic-merge-patch+json"


def _missing(exc: ApiException) -> bool:
    return exc.status == 404


class Api:
    def __init__(self, kubeconfig: str | None) -> None:
        self.client = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.client)
        self.coordination = client.CoordinationV1Api(self.client)
        url = urlparse(self.client.configuration.host)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443

    def close(self) -> None:
        self.client.close()

    def _json(self, response: Any) -> Any:
        return json.loads(response.data)

    def _read(self, call: Any, *args: str) -> Any:
        """A read (`_preload_content=False`) as a dict, or None when the object does not exist."""
        try:
            return self._json(call(*args, _preload_content=False))
        except ApiException as exc:
            if _missing(exc):
                return None
            raise

    # --------------------------------------------------------------- lookups

    def config_map_bytes(self, namespace: str, name: str) -> dict[str, bytes] | None:
        cm = self._read(self.core.read_namespaced_config_map, name, namespace)
        if cm is None:
            return None
        out = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return out

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        data = self.config_map_bytes(namespace, name)
        return None if data is None else {k: v.decode(errors="replace") for k, v in data.items()}

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """`data` as the API returns it (base64)."""
        s = self._read(self.core.read_namespaced_secret, name, namespace)
        return None if s is None else dict(s.get("data") or {})

    def claim_host_path(self, namespace: str, claim: str) -> str | None:
        """Where a bound claim's volume lives on this machine: its PV's hostPath or local path."""
        pvc = self._read(self.core.read_namespaced_persistent_volume_claim, claim, namespace)
        volume = ((pvc or {}).get("spec") or {}).get("volumeName")
        if not volume:
            return None
        pv = self._read(self.core.read_persistent_volume, volume)
        spec = (pv or {}).get("spec") or {}
        return (spec.get("hostPath") or spec.get("local") or {}).get("path")

    def services(self, namespace: str) -> list[str]:
        items = self._json(self.core.list_namespaced_service(namespace, _preload_content=False)).get("items", [])
        return [s["metadata"]["name"] for s in items]

    # ------------------------------------------------- services (services.py)

    def list_services(self) -> list[dict[str, Any]]:
        return self._json(self.core.list_service_for_all_namespaces(_preload_content=False)).get("items", [])

    def annotate_service(self, namespace: str, name: str, key: str, value: str) -> None:
        try:
            self.core.patch_namespaced_service(name, namespace, {"metadata": {"annotations": {key: value}}})
        except ApiException as exc:
            if not _missing(exc):
                raise

    def token(self, namespace: str, account: str, pod: Mapping[str, Any], audience: str | None,
              seconds: int) -> tuple[str, dt.datetime]:
        """TokenRequest for the pod's ServiceAccount, bound to the pod (invalid once it is deleted)."""
        meta = pod["metadata"]
        spec: dict[str, Any] = {"expirationSeconds": seconds,
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                                   "uid": meta["uid"]}}
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        out = self._json(self.core.create_namespaced_service_account_token(account, namespace, body,
                                                                           _preload_content=False))
        expires = dt.datetime.fromisoformat(out["status"]["expirationTimestamp"].replace("Z", "+00:00"))
        return out["status"]["token"], expires

    # ------------------------------------------------------------------ pods

    def list_pods(self, node: str) -> tuple[list[dict[str, Any]], str]:
        out = self._json(self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}",
                                                               _preload_content=False))
        return out.get("items", []), out["metadata"]["resourceVersion"]

    def watch_pods(self, node: str, resource_version: str, timeout_s: int = 60) -> Iterator[tuple[str, dict]]:
        w = watch.Watch()
        for event in w.stream(self.core.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={node}",
                              resource_version=resource_version, timeout_seconds=timeout_s,
                              allow_watch_bookmarks=False):
            yield event["type"], event["raw_object"]

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_pod, name, namespace)

    def patch_pod_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return self._json(self.core.patch_namespaced_pod_status(name, namespace, {"status": status},
                                                                    _content_type=SMP, _preload_content=False))
        except ApiException as exc:
            if _missing(exc):
                return None
            raise

    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        """What the kubelet does once a deleted pod's containers are gone: delete it with grace 0."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body, grace_period_seconds=0,
                                            _preload_content=False)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def event(self, pod: Mapping[str, Any], node: str, kind: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        now = dt.datetime.now(dt.UTC)
        body = {"metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta["uid"]},
                "type": kind, "reason": reason, "message": message[:1000],
                "source": {"component": "llamaops-devnode", "host": node},
                "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "count": 1,
                "reportingComponent": "llamaops-devnode", "reportingInstance": node}
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
        except ApiException as exc:  # events are a courtesy
            log.debug("event %s on %s: HTTP %s", reason, meta["name"], exc.status)

    # ----------------------------------------------------------- node, lease

    def upsert_node(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        name = manifest["metadata"]["name"]
        try:
            node = self._json(self.core.create_node(manifest, _preload_content=False))
        except ApiException as exc:
            if exc.status != 409:
                raise
            patch = {"metadata": {"labels": manifest["metadata"]["labels"]}, "spec": manifest["spec"]}
            node = self._json(self.core.patch_node(name, patch, _content_type=SMP, _preload_content=False))
        self.patch_node_status(name, manifest["status"])
        return node

    def patch_node_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.core.patch_node_status(name, {"status": status}, _content_type=SMP, _preload_content=False)

    def renew_lease(self, manifest: Mapping[str, Any]) -> None:
        name = manifest["metadata"]["name"]
        try:
            self.coordination.patch_namespaced_lease(name, LEASE_NAMESPACE, {"spec": manifest["spec"]},
                                                     _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, manifest, _preload_content=False)
