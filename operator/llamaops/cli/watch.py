"""`llamaops watch [NAME] [-A]`: live progress of fine-tuning runs, from a watch on the resource.

One list, then a watch from its resourceVersion (server-side timeout, so a
dead connection is noticed, then resumed from the last version seen; re-listed
when the server says the version is gone). Nothing is polled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from llamaops import status as st
from llamaops.api.meta import FINETUNES, GROUP, VERSION
from llamaops.cli.common import ContextOpt, KubeconfigOpt, NamespaceOpt, run

TERMINAL = ("Succeeded", "Failed")
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3
WATCH_SECONDS = 30  # server-side timeout of one watch request; then it is resumed


def waiting_reason(condition: dict[str, Any] | None) -> str:
    """Why a run waits, from its Queued condition (the operator writes "position N: <why>")."""
    if not condition or condition.get("status") != "True":
        return ""
    return re.sub(r"^position \d+: ", "", condition.get("message") or "") or condition.get("reason", "")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class RunView:
    """What the watch shows of one LlamaFineTune, read from its status."""

    namespace: str
    name: str
    phase: str
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    queue_position: int | None = None
    waiting: str = ""  # why it waits (Queued condition)
    adapter: str | None = None
    failure: str = ""  # reason: message of the Failed condition

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL


def view(obj: dict[str, Any], now: dt.datetime | None = None) -> RunView:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    progress = status.get("progress") or {}
    v = RunView(meta.get("namespace", ""), meta.get("name", ""), status.get("phase") or "Pending")
    v.step = int(progress.get("step") or 0)
    v.total_steps = progress.get("totalSteps")
    v.epoch, v.loss = progress.get("epoch"), progress.get("loss")
    v.learning_rate, v.tokens_per_second = progress.get("learningRate"), progress.get("tokensPerSecond")
    eta = progress.get("etaSeconds")
    if eta is not None:
        # The trainer computed it at updatedAt: count down from there.
        updated = st.parse_time(progress.get("updatedAt"))
        now = now or dt.datetime.now(dt.UTC)
        elapsed = max(0.0, (now - updated).total_seconds()) if updated else 0.0  # clocks may disagree
        v.eta_seconds = max(0.0, eta - elapsed)
    conditions = status.get("conditions")
    v.queue_position = status.get("queuePosition")
    v.waiting = waiting_reason(st.condition(conditions, st.QUEUED))
    if v.phase == "Suspended":
        suspended = st.condition(conditions, st.SUSPENDED)
        v.waiting = (suspended or {}).get("message") or "spec.suspend is true"
    v.adapter = (status.get("adapter") or {}).get("uri")
    if v.phase == "Failed":
        failed = st.condition(conditions, st.FAILED) or st.condition(conditions, st.VALID) or {}
        reason, message = failed.get("reason", ""), failed.get("message", "")
        v.failure = f"{reason}: {message}" if reason and message else reason or message or "no reason given"
    return v


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def line(v: RunView) -> str:
    """One plain line per state change (--no-live, and what is left on screen at the end)."""
    head = f"{v.key} {v.phase}"
    if v.phase == "Succeeded":
        return f"{head}: adapter {v.adapter or '(location not reported)'}"
    if v.phase == "Failed":
        return f"{head}: {v.failure}"
    if v.phase in ("Queued", "Pending", "Suspended"):
        pos = f" position {v.queue_position}" if v.queue_position else ""
        return f"{head}{pos}" + (f": {v.waiting}" if v.waiting else "")
    parts = [head, f"step {v.step}/{v.total_steps}" if v.total_steps else f"step {v.step}"]
    if v.epoch is not None:
        parts.append(f"epoch {v.epoch:.2f}")
    if v.loss is not None:
        parts.append(f"loss {v.loss:.4g}")
    if v.tokens_per_second is not None:
        parts.append(f"tok/s {v.tokens_per_second:.0f}")
    if v.eta_seconds is not None:
        parts.append(f"eta {duration(v.eta_seconds)}")
    return " ".join(parts)


def _stable_line(v: RunView) -> str:
    """The line without the ETA countdown, to decide whether anything changed."""
    return line(RunView(**{**v.__dict__, "eta_seconds": None}))


class Board:
    """The live view: rebuilt at every refresh, so the ETA counts down between updates."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def __rich__(self) -> Any:
        from rich.markup import escape
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, pad_edge=False, expand=False)
        for col in ("run", "phase", "progress", "step", "epoch", "loss", "tok/s", "ETA"):
            table.add_column(col, justify="right" if col in ("step", "epoch", "loss", "tok/s", "ETA") else "left",
                             no_wrap=col != "progress")
        now = dt.datetime.now(dt.UTC)
        for key in sorted(self.objects):
            v = view(self.objects[key], now)
            colour = {"Succeeded": "green", "Failed": "red", "Running": "cyan"}.get(v.phase, "yellow")
            phase = f"[{colour}]{v.phase}[/]"
            if v.phase == "Succeeded":
                table.add_row(escape(v.key), phase, f"adapter: {escape(v.adapter or '(not reported)')}")
            elif v.phase == "Failed":
                table.add_row(escape(v.key), phase, f"[red]{escape(v.failure)}[/]")
            elif v.phase in ("Running", "Admitted") and (v.total_steps or v.step):
                bar = ProgressBar(total=float(v.total_steps or 0) or None, completed=v.step, width=30)
                table.add_row(escape(v.key), phase, bar, f"{v.step}/{v.total_steps or '?'}",
                              _num(v.epoch, ".2f"), _num(v.loss, ".4g"), _num(v.tokens_per_second, ".0f"),
                              duration(v.eta_seconds))
            else:
                pos = f"queue position {v.queue_position}" if v.queue_position else ""
                why = "; ".join(x for x in (pos, v.waiting) if x)
                table.add_row(escape(v.key), phase, escape(why))
        if not self.objects:
            table.add_row("(no LlamaFineTunes yet)")
        return table


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class NotFound(Exception):
    pass


async def follow(api: Any, namespace: str | None, name: str | None, on_change: Callable[[dict[str, dict]], None],
                 done: Callable[[dict[str, dict]], bool], watch_seconds: int = WATCH_SECONDS) -> dict[str, dict]:
    """Lists, then watches LlamaFineTunes until `done(objects)`; calls `on_change(objects)` after every change.

    namespace None: every namespace. name: that one object (NotFound when it does not exist or is deleted).
    """
    from aiohttp import ClientError
    from kubernetes_asyncio import client, watch
    from kubernetes_asyncio.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    objects: dict[str, dict[str, Any]] = {}
    selector = {"field_selector": f"metadata.name={name}"} if name else {}
    if namespace is None:  # the same call lists and (with a resourceVersion) watches
        func, args = custom.list_cluster_custom_object, (GROUP, VERSION, FINETUNES)
    else:
        func, args = custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, FINETUNES)

    async def relist() -> str:
        listed = await func(*args, **selector)
        objects.clear()
        objects.update({_key(o): o for o in listed.get("items", [])})
        if name and not objects:
            where = f"namespace {namespace}" if namespace else "any namespace"
            raise NotFound(f'LlamaFineTune "{name}" not found in {where}')
        on_change(objects)
        return listed["metadata"]["resourceVersion"]

    version = await relist()
    failures = 0
    while not done(objects):
        try:
            async with watch.Watch() as w:
                stream = w.stream(func, *args, resource_version=version, timeout_seconds=watch_seconds,
                                  allow_watch_bookmarks=True, _request_timeout=watch_seconds + 15, **selector)
                async for event in stream:
                    failures = 0
                    obj = event["raw_object"]
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event["type"] == "BOOKMARK":
                        continue
                    if event["type"] == "DELETED":
                        objects.pop(_key(obj), None)
                        if name:
                            raise NotFound(f'LlamaFineTune "{name}" was deleted')
                    else:
                        objects[_key(obj)] = obj
                    on_change(objects)
                    if done(objects):
                        return objects
        except ApiException as exc:
            if exc.status != 410:
                raise
            version = await relist()  # our version is too old: start over from a fresh list
        except (ClientError, asyncio.TimeoutError):
            failures += 1
            if failures > 5:
                raise
            await asyncio.sleep(min(2 ** failures, 10))
            version = await relist()
    return objects


def _all_done(objects: dict[str, dict[str, Any]]) -> bool:
    return bool(objects) and all(view(o).done for o in objects.values())


async def _watch(name: str | None, namespace: str | None, live: bool, timeout: float | None,
                 kubeconfig: str | None, context: str | None) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.markup import escape

    from llamaops import kube

    console = Console(highlight=False, soft_wrap=True)
    board = Board()
    printed: dict[str, str] = {}

    def on_change(objects: dict[str, dict[str, Any]]) -> None:
        board.objects = dict(objects)
        if not live:
            if not objects and not printed:
                printed[""] = "none"
                console.print("no LlamaFineTunes yet: waiting for one")
            for key in sorted(objects):
                v = view(objects[key])
                stable = _stable_line(v)
                if printed.get(key) != stable:
                    printed[key] = stable
                    console.print(escape(line(v)))

    async with kube.connect(kubeconfig, context) as api:
        display = Live(board, console=console, refresh_per_second=2, transient=True) if live else None
        if display:
            display.start()
        try:
            objects = await asyncio.wait_for(follow(api, namespace, name, on_change, _all_done), timeout)
        except NotFound as exc:
            if display:
                display.stop()
            console.print(f"llamaops watch: {escape(str(exc))}", style="red")
            return EXIT_NOT_FOUND
        except asyncio.TimeoutError:
            if display:
                display.stop()
                console.print(board)
            console.print(f"llamaops watch: still not finished after {timeout:g}s", style="yellow")
            return EXIT_TIMEOUT
        if display:
            display.stop()
            console.print(board)
    views = [view(o) for o in objects.values()]
    failed = [v for v in views if v.phase == "Failed"]
    for v in sorted(views, key=lambda v: v.key):
        if live or printed.get(v.key) != _stable_line(v):
            console.print(escape(line(v)), style="red" if v.phase == "Failed" else "green")
    return EXIT_FAILED if failed else EXIT_SUCCEEDED


def watch(
    name: Annotated[str | None, typer.Argument(help="The LlamaFineTune; omit for every run in the namespace.",
                                               show_default=False)] = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="Runs of every namespace.")] = False,
    namespace: NamespaceOpt = None,
    live: Annotated[bool | None, typer.Option("--live/--no-live", help="Progress bars (default on a terminal), or "
                                              "one plain line per change.", show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).",
                                                  show_default=False)] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Follow fine-tuning runs live: progress, queue position, and the adapter at the end.

    Progress bars with steps, epoch, loss, tokens/s and ETA for running runs; queue position and why it waits
    for queued ones; the adapter's location, or the failure's reason, at the end.

    Returns when every run shown has finished. Exit 0: all Succeeded; 1: a run Failed (its reason is printed);
    2: not found, or the cluster cannot be reached; 3: --timeout passed.
    """
    from llamaops import kube

    if all_namespaces and name:
        typer.echo("llamaops watch: give a NAME or --all-namespaces, not both", err=True)
        raise typer.Exit(2)
    ns = None if all_namespaces else (namespace or kube.current_namespace(kubeconfig, context))
    use_live = sys.stdout.isatty() if live is None else live
    code = run(_watch(name, ns, use_live, timeout, kubeconfig, context), "watch")
    raise typer.Exit(code)
