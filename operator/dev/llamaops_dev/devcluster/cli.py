"""`llamaops dev-cluster up|down|status`."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from llamaops_dev.devcluster.cluster import DevCluster
from llamaops_dev.devcluster.config import ClusterConfig, Ports
from llamaops_dev.devcluster.errors import DevClusterError

app = typer.Typer(
    no_args_is_help=True,
    help="A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) "
    "with simulated GPU nodes (kwok), optionally with Kueue. State lives in $LLAMAOPS_HOME/dev-cluster (default ~/.llamaops).",
)

ENV = "LLAMAOPS_DEV_CLUSTER_"


def _port(name: str, help: str):  # noqa: A002
    return typer.Option(f"--{name}-port", envvar=f"{ENV}{name.upper().replace('-', '_')}_PORT", help=help, show_default=False)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(exc: DevClusterError) -> typer.Exit:
    typer.echo(f"dev-cluster: error: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def up(
    gpu_nodes: Annotated[int | None, typer.Option(help="GPU nodes (default 2)", show_default=False)] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="nvidia.com/gpu per GPU node (default 8)", show_default=False)] = None,
    gpu_product: Annotated[str | None, typer.Option(help="nvidia.com/gpu.product label (default NVIDIA-H100-80GB-HBM3)", show_default=False)] = None,
    gpu_memory: Annotated[int | None, typer.Option(help="nvidia.com/gpu.memory label, MiB (default 81559)", show_default=False)] = None,
    cpu_nodes: Annotated[int | None, typer.Option(help="CPU-only nodes (default 1)", show_default=False)] = None,
    port_offset: Annotated[
        int | None, typer.Option(envvar=f"{ENV}PORT_OFFSET", help="Add this to every default port (a second cluster beside the first).", show_default=False)
    ] = None,
    apiserver_port: Annotated[int | None, _port("apiserver", f"kube-apiserver port (default {Ports.apiserver})")] = None,
    etcd_port: Annotated[int | None, _port("etcd", f"etcd client port (default {Ports.etcd})")] = None,
    etcd_peer_port: Annotated[int | None, _port("etcd-peer", f"etcd peer port (default {Ports.etcd_peer})")] = None,
    controller_manager_port: Annotated[int | None, _port("controller-manager", f"kube-controller-manager port (default {Ports.controller_manager})")] = None,
    scheduler_port: Annotated[int | None, _port("scheduler", f"kube-scheduler port (default {Ports.scheduler})")] = None,
    kwok_port: Annotated[int | None, _port("kwok", f"kwok health port (default {Ports.kwok})")] = None,
    kueue: Annotated[
        bool | None,
        typer.Option(
            "--kueue/--no-kueue",
            envvar=f"{ENV}KUEUE",
            help="Also run Kueue (its CRDs and controller manager; jobs queue through LocalQueues). Default: off.",
            show_default=False,
        ),
    ] = None,
    kueue_health_port: Annotated[int | None, _port("kueue-health", f"Kueue health probe port (default {Ports.kueue_health})")] = None,
    kueue_webhook_port: Annotated[int | None, _port("kueue-webhook", f"Kueue webhook server port (default {Ports.kueue_webhook})")] = None,
    kueue_metrics_port: Annotated[int | None, _port("kueue-metrics", f"Kueue metrics port (default {Ports.kueue_metrics})")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a Ready cluster.")] = 120.0,
) -> None:
    """Start the cluster (or find it running); print the kubeconfig path.

    Options are remembered for the next `up`; `down --purge` forgets them.
    """
    # A terminated `up` stops what it started, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = DevCluster()
    try:
        config = cluster.config()
        if port_offset is not None:
            config = ClusterConfig(ports=Ports().shifted(port_offset), nodes=config.nodes, kueue=config.kueue)
        config = config.with_overrides(
            ports={
                "apiserver": apiserver_port,
                "etcd": etcd_port,
                "etcd_peer": etcd_peer_port,
                "controller_manager": controller_manager_port,
                "scheduler": scheduler_port,
                "kwok": kwok_port,
                "kueue_health": kueue_health_port,
                "kueue_webhook": kueue_webhook_port,
                "kueue_metrics": kueue_metrics_port,
            },
            nodes={
                "gpu_nodes": gpu_nodes,
                "gpus_per_node": gpus_per_node,
                "gpu_product": gpu_product,
                "gpu_memory_mib": gpu_memory,
                "cpu_nodes": cpu_nodes,
            },
            kueue=kueue,
        )
        path = cluster.up(config, timeout=timeout)
    except DevClusterError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        typer.echo("dev-cluster: interrupted", err=True)
        raise typer.Exit(130) from None
    typer.echo(str(path))


@app.command()
def down(purge: Annotated[bool, typer.Option("--purge", help="Also remove the state directory (config, logs, certificates).")] = False) -> None:
    """Stop every component of the cluster."""
    cluster = DevCluster()
    try:
        cluster.down(purge=purge)
    except DevClusterError as exc:
        raise _fail(exc) from None
    typer.echo(f"dev-cluster: stopped{' and removed ' + str(cluster.state.root) if purge else ''}", err=True)


@app.command()
def status() -> None:
    """Show each component's state; exit 0 only if all are running and healthy."""
    cluster = DevCluster()
    states = cluster.status()
    for s in states:
        state = "stopped" if not s.running else ("running" if s.healthy else "unhealthy")
        pid = f"pid {s.pid}" if s.running else ""
        ports = ",".join(map(str, s.ports))
        typer.echo(f"{s.name:<24} {state:<9} {pid:<11} port {ports:<17} log {s.log}")
    kc = cluster.kubeconfig
    typer.echo(f"kubeconfig: {kc}{'' if kc.exists() else ' (missing)'}")
    if not all(s.running and s.healthy for s in states):
        raise typer.Exit(1)
