"""`llamaops operator`: the kopf operator process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from llamaops.handlers.runtime import Runtime, runtime
from llamaops.kube import Kube, api_client
from llamaops.settings import Settings


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping lives in status.kopf, never in metadata: GitOps tools
    # compare labels and annotations, and must see no drift from us.
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.lastHandled")
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.finalizer = "llamaops.io/finalizer"
    # One active replica (Deployment strategy Recreate); no peering objects needed.
    settings.peering.standalone = True
    # Least privilege (llamaops/tools/rbac.py): no list/watch of CRDs or namespaces. The CRDs must exist
    # before the operator starts (Helm's crds/, Argo CD's ordering); one added later needs a restart.
    settings.scanning.disabled = True
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    # Of all ConfigMaps, the API server sends only the runs' reports.
    from llamaops.handlers.reports import REPORT_SELECTOR

    settings.watching.label_selectors["configmaps"] = REPORT_SELECTOR
    settings.queueing.worker_limit = None  # required with indexes: no start-up deadlock
    settings.networking.error_backoffs = [1, 2, 5, 10]


@kopf.on.cleanup()
async def report(logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    # Read by bench/operator_queue.py: API calls made by our own client (kopf's watches excluded).
    logger.info("llamaops api requests: %d", runtime(memo).kube.requests)


def watch_scope(settings: Settings) -> dict[str, Any]:
    """Which namespaces kopf watches.

    A queue the operator admits for itself counts every GPU pod in the cluster, so it watches every
    namespace. Under an external queue (Kueue) nothing reads those indexes: an operator for some
    namespaces watches only them, and never lists (nor holds in memory at start-up) the objects of the
    rest of the cluster.
    """
    if settings.queue_policy().external and settings.namespaces:
        return {"clusterwide": False, "namespaces": list(settings.namespaces)}
    return {"clusterwide": True}


def run(settings: Settings, *, verbose: bool = False) -> None:
    """Run until interrupted."""
    import llamaops.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Its debug log prints whole response bodies (Secrets included, were we to read any).
    logging.getLogger("kubernetes_asyncio").setLevel(logging.INFO)

    async def main() -> None:
        if settings.metrics_port:
            from llamaops import metrics

            await metrics.serve(settings.metrics_port)
        api = await api_client()
        try:
            await kopf.operator(
                **watch_scope(settings),
                memo=kopf.Memo(runtime=Runtime.start(settings, Kube(api))),
                liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
            )
        finally:
            await api.close()

    asyncio.run(main())
