"""Training reports: what a run's pods wrote in its report ConfigMap, checked, becomes status.progress.

The pod may write nothing else (its Role), so the status the operator acts on is
the operator's own. A report reaches the status only when its ConfigMap is the
one the operator made for that very run (its controller owner reference carries
the run's uid) and its progress parses as api.finetune.Progress.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from llamaops.api.constants import (
    COMPONENT_REPORT,
    FINETUNES,
    KIND_FINETUNE,
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)
from llamaops.builders.naming import controller_ref
from llamaops.handlers.runtime import runtime
from llamaops.state.finetune import ACTIVE, Report

REPORT_LABELS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT_REPORT}
# The watch asks the API server for these ConfigMaps only (operator.configure), not every ConfigMap.
REPORT_SELECTOR = ",".join(f"{k}={v}" for k, v in REPORT_LABELS.items())


@kopf.on.event("", "v1", "configmaps", labels=REPORT_LABELS)
async def report_changed(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,  # noqa: A002
                         finetune_index: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    rt = runtime(memo)
    owner = controller_ref(body, KIND_FINETUNE)
    if type == "DELETED" or owner is None or not rt.in_scope(namespace):
        return
    name, uid = owner["name"], owner.get("uid")
    run = next(iter(finetune_index.get((namespace, name), [])), None)
    if run is None or run.uid != uid or run.phase not in ACTIVE:
        return  # not this run's (any more), or it is not training: nothing to show
    report = Report.of(body.get("data"))
    for problem in report.problems:
        logger.warning("report of %s/%s refused: %s", namespace, name, problem)
    progress = report.progress_status()
    if progress is None or progress == dict(run.progress):
        return
    await rt.kube.patch_status(FINETUNES, namespace, name, {"progress": progress})
