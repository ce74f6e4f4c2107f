"""`llamaops logs NAME`: the training pods' logs, each line prefixed with its pod's rank.

The rank is the pod's completion index in the Indexed Job, which is torchrun's
node rank (--node-rank=$(JOB_COMPLETION_INDEX)); with several processes per
pod, the trainer's own log format names the global rank inside the line. When a
gang was restarted, the newest pod of each index is shown.
"""

from __future__ import annotations

import asyncio
import heapq
import re
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from llamaops.api.meta import FINETUNES, GROUP, VERSION
from llamaops.cli.common import ContextOpt, KubeconfigOpt, NamespaceOpt, run

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\S+) (.*)$")


@dataclass
class TrainingPod:
    name: str
    rank: int | None
    phase: str
    created: str


def rank_of(pod: dict[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(INDEX_KEY) or (meta.get("labels") or {}).get(INDEX_KEY)
    return int(value) if value is not None and str(value).isdigit() else None


def training_pods(pods: list[dict[str, Any]]) -> list[TrainingPod]:
    """The newest pod of each completion index, in rank order."""
    newest: dict[Any, TrainingPod] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        tp = TrainingPod(meta.get("name", ""), rank_of(pod), (pod.get("status") or {}).get("phase", ""),
                         meta.get("creationTimestamp") or "")
        key = tp.rank if tp.rank is not None else tp.name
        if key not in newest or tp.created > newest[key].created:
            newest[key] = tp
    return sorted(newest.values(), key=lambda p: (p.rank is None, p.rank or 0, p.name))


def prefix(rank: int | None, line: str) -> str:
    return f"[rank {'?' if rank is None else rank}] {line}"


def prefixed_lines(rank: int | None, text: str) -> list[str]:
    return [prefix(rank, line) for line in text.splitlines()]


def merge_by_time(logs: list[tuple[int | None, str]], keep_timestamps: bool = False) -> list[str]:
    """Logs read with timestamps=True, one text per pod, merged into one chronological, rank-prefixed stream."""
    streams = []
    for order, (rank, text) in enumerate(logs):
        entries = []
        last = ""
        for line in text.splitlines():
            m = _STAMP.match(line)
            stamp, body = (m.group(1), m.group(2)) if m else (last, line)
            last = stamp
            entries.append((stamp, order, prefix(rank, f"{stamp} {body}" if keep_timestamps else body)))
        streams.append(entries)
    return [entry[2] for entry in heapq.merge(*streams)]


def _api_message(exc: Exception) -> str:
    """The API server's message, else the answer's status."""
    from llamaops import kube

    return (kube.api_message(exc) or f"{getattr(exc, 'status', '')} {getattr(exc, 'reason', '')}".strip()
            or str(exc))


async def _logs(name: str, namespace: str, follow: bool, tail: int | None, timestamps: bool,
                kubeconfig: str | None, context: str | None) -> int:
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    from llamaops import kube
    from llamaops.builders.finetune import CONTAINER
    from llamaops.builders.naming import LABEL_COMPONENT, LABEL_FINETUNE, label_value

    async with kube.connect(kubeconfig, context) as api:
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        try:
            obj = await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, FINETUNES, name)
        except ApiException as exc:
            if exc.status == 404:
                typer.echo(f'llamaops logs: LlamaFineTune "{name}" not found in namespace {namespace}', err=True)
                return 2
            raise
        selector = f"{LABEL_FINETUNE}={label_value(name)},{LABEL_COMPONENT}=trainer"
        listed = await core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        pods = training_pods((await kube.raw_json(listed))["items"])
        if not pods:
            phase = (obj.get("status") or {}).get("phase") or "Pending"
            typer.echo(f"llamaops logs: {name} has no training pods (phase {phase}): not admitted yet, or its "
                       "pods are gone", err=True)
            return 1
        kw: dict[str, Any] = {"container": CONTAINER}
        if tail is not None:
            kw["tail_lines"] = tail

        if follow:
            async def stream(pod: TrainingPod) -> bool:
                try:
                    resp = await core.read_namespaced_pod_log(pod.name, namespace, follow=True, timestamps=timestamps,
                                                              _preload_content=False, **kw)
                    await kube.raise_for_status(resp)
                    async for raw in resp.content:
                        typer.echo(prefix(pod.rank, raw.decode(errors="replace").rstrip("\n")))
                    return True
                except ApiException as exc:
                    typer.echo(prefix(pod.rank, f"(no logs from pod {pod.name}, {pod.phase}: {_api_message(exc)})"),
                               err=True)
                    return False

            results = await asyncio.gather(*(stream(p) for p in pods))
            return 0 if any(results) else 1

        texts: list[tuple[int | None, str]] = []
        for pod in pods:
            try:
                text = await core.read_namespaced_pod_log(pod.name, namespace, timestamps=True, **kw)
                texts.append((pod.rank, text or ""))
            except ApiException as exc:
                typer.echo(prefix(pod.rank, f"(no logs from pod {pod.name}, {pod.phase}: {_api_message(exc)})"),
                           err=True)
        for out in merge_by_time(texts, keep_timestamps=timestamps):
            typer.echo(out)
        return 0 if texts else 1


def logs(
    name: Annotated[str, typer.Argument(help="The LlamaFineTune.")],
    namespace: NamespaceOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines until the pods end.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines of each pod.", show_default=False)] = None,
    timestamps: Annotated[bool, typer.Option("--timestamps", help="Keep the kubelet's timestamps.")] = False,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """The training pods' logs, merged in time order, each line prefixed with its pod's rank.

    The prefix is \\[rank N], N the pod's completion index (torchrun's node rank).

    Exit 0: logs shown; 1: no pod had logs to show (not started yet, or gone); 2: no such run, or no cluster.
    """
    from llamaops import kube

    ns = namespace or kube.current_namespace(kubeconfig, context)
    raise typer.Exit(run(_logs(name, ns, follow, tail, timestamps, kubeconfig, context), "logs"))
