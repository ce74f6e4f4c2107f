"""`llamaops queue`: the waiting runs in queue order, and GPU capacity and use per GPU product.

Capacity is counted as the built-in queue counts it (llamaops.queue.free_capacity):
each node's allocatable nvidia.com/gpu minus the GPU requests of every
non-terminated pod bound to it, ours or not, grouped by the node's
nvidia.com/gpu.product label.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Annotated, Any

import typer

from llamaops import status as st
from llamaops.api.meta import FINETUNES, GROUP, VERSION
from llamaops.cli.common import ContextOpt, KubeconfigOpt, NamespaceOpt, run
from llamaops.cli.watch import waiting_reason
from llamaops.state.finetune import ACTIVE, RunSnapshot

WAITING_PHASES = ("Pending", "Queued", "Suspended")
NO_PRODUCT = "(no gpu.product label)"


class Output(str, Enum):
    text = "text"
    json = "json"


@dataclass
class QueueRow:
    position: int | None
    priority: int
    namespace: str
    name: str
    phase: str
    nodes: int
    gpus_per_node: int
    gpu_product: str | None
    waiting_since: str | None  # RFC 3339
    waiting_seconds: float | None
    why: str
    gpus: int


@dataclass
class ProductUse:
    product: str
    nodes: int
    gpus: int
    used: int

    @property
    def free(self) -> int:
        return max(self.gpus - self.used, 0)


def queue_rows(finetunes: list[dict[str, Any]], now: dt.datetime | None = None) -> list[QueueRow]:
    """The runs that wait, in the order the queue serves them: by the position the operator reported, then
    (runs it has given none yet) in its own order (llamaops.queue's QueuedRun.sort_key)."""
    now = now or dt.datetime.now(dt.UTC)
    rows: list[tuple[tuple[Any, ...], QueueRow]] = []
    for obj in finetunes:
        status, run = obj.get("status") or {}, RunSnapshot.of(obj)
        phase = run.phase or "Pending"
        if phase not in WAITING_PHASES and not (phase == "Admitted" and run.suspend):
            continue
        queued = st.condition(list(run.conditions), st.QUEUED)
        since = run.created
        why = waiting_reason(queued)
        if why:
            since = queued.get("lastTransitionTime") or since
        if phase == "Suspended" or run.suspend:
            why = "suspended (spec.suspend: true)"
        elif phase == "Pending" and not why:
            why = "not yet seen by the operator"
        started = st.parse_time(since)
        res = run.resources
        row = QueueRow(
            position=status.get("queuePosition"), priority=run.queue.priority, namespace=run.namespace,
            name=run.name, phase=phase, nodes=res.nodes, gpus_per_node=res.gpus_per_node,
            gpu_product=res.gpu_product, waiting_since=since,
            waiting_seconds=(now - started).total_seconds() if started else None, why=why, gpus=run.gpus)
        rows.append(((row.position is None, row.position or 0, *run.queued().sort_key()), row))
    return [row for _, row in sorted(rows, key=lambda pair: pair[0])]


def gpu_use(nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> list[ProductUse]:
    """GPU nodes, GPUs and GPUs in use per gpu.product, as the built-in queue counts them."""
    from llamaops.queue import free_capacity

    by_product: dict[str, ProductUse] = {}
    for node in free_capacity(nodes, pods):
        if node.allocatable <= 0:
            continue
        product = node.product or NO_PRODUCT
        use = by_product.setdefault(product, ProductUse(product, 0, 0, 0))
        use.nodes += 1
        use.gpus += node.allocatable
        use.used += node.allocatable - node.free
    return sorted(by_product.values(), key=lambda u: u.product)


def active_runs(finetunes: list[dict[str, Any]]) -> tuple[int, int]:
    """(runs admitted or running, the GPUs they hold)."""
    runs = gpus = 0
    for obj in finetunes:
        run = RunSnapshot.of(obj)
        if run.phase in ACTIVE and not run.suspend:
            runs += 1
            gpus += run.gpus
    return runs, gpus


def _gpus(row: QueueRow) -> str:
    if row.gpus_per_node == 0:
        return "CPU"
    what = f"{row.nodes}x{row.gpus_per_node}" if row.nodes > 1 else str(row.gpus_per_node)
    return f"{what} {row.gpu_product.removeprefix('NVIDIA-')}" if row.gpu_product else what


def age(seconds: float | None) -> str:
    """kubectl's AGE style: 45s, 3m12s, 5h4m, 2d3h."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


WIDE = 130  # below this, the reasons go under the table instead of in a column


def render(rows: list[QueueRow], use: list[ProductUse], active: tuple[int, int], width: int = 250) -> list[Any]:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    wide = width >= WIDE
    queue = Table(title="Queue", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("pos", "priority", "namespace/name", "phase", "GPUs", "waiting"):
        queue.add_column(col, justify="right" if col in ("pos", "priority", "waiting") else "left",
                         no_wrap=col != "namespace/name", overflow="fold")
    if wide:
        queue.add_column("why it waits", min_width=24, overflow="fold")
    for r in rows:
        cells = [str(r.position) if r.position else "-", str(r.priority), escape(f"{r.namespace}/{r.name}"),
                 r.phase, escape(_gpus(r)), age(r.waiting_seconds)]
        queue.add_row(*cells, *([escape(r.why)] if wide else []))
    if not rows:
        queue.add_row("", "", "(nothing waiting)")
    parts: list[Any] = [queue]
    if not wide and any(r.why for r in rows):
        parts.append("why they wait:")
        parts += [f"  {r.position or '-'} {escape(r.namespace)}/{escape(r.name)}: {escape(r.why)}"
                  for r in rows if r.why]
    cap = Table(title="GPU capacity", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("product", "nodes", "GPUs", "in use", "free"):
        cap.add_column(col, justify="left" if col == "product" else "right")
    for u in use:
        cap.add_row(escape(u.product), str(u.nodes), str(u.gpus), str(u.used), str(u.free))
    if not use:
        cap.add_row("(no nodes with nvidia.com/gpu)")
    runs, gpus = active
    parts += [f"admitted or running: {runs} run(s) holding {gpus} GPU(s)", cap]
    return parts


async def _fetch(namespace: str | None, kubeconfig: str | None, context: str | None) -> tuple[list, list, list]:
    from kubernetes_asyncio import client

    from llamaops import kube

    async with kube.connect(kubeconfig, context) as api:
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        if namespace is None:
            fts = await custom.list_cluster_custom_object(GROUP, VERSION, FINETUNES)
        else:
            fts = await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, FINETUNES)
        nodes = await core.list_node(_preload_content=False)
        pods = await core.list_pod_for_all_namespaces(
            field_selector="status.phase!=Succeeded,status.phase!=Failed", _preload_content=False)
        return (fts.get("items", []), (await kube.raw_json(nodes))["items"],
                (await kube.raw_json(pods))["items"])


def queue(
    namespace: NamespaceOpt = None,
    output: Annotated[Output, typer.Option("--output", "-o", help="text, or json.")] = Output.text,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """The GPU queue, and the cluster's GPU capacity and use per GPU product.

    The waiting runs in queue order (position, priority, run, GPUs, waiting since, why it waits). -n limits the
    runs to one namespace; capacity is always the whole cluster's.
    """
    finetunes, nodes, pods = run(_fetch(namespace, kubeconfig, context), "queue")
    rows, use, active = queue_rows(finetunes), gpu_use(nodes, pods), active_runs(finetunes)
    if output is Output.json:
        typer.echo(json.dumps({
            "queue": [asdict(r) for r in rows],
            "running": {"runs": active[0], "gpus": active[1]},
            "capacity": [{**asdict(u), "free": u.free} for u in use],
        }, indent=2))
        return
    from rich.console import Console

    # Piped (not a terminal): lines as wide as they need, like kubectl's tables, for grep and logs.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 250)
    for part in render(rows, use, active, console.width):
        console.print(part)
