"""Which namespaces the operator's watches cover."""

from __future__ import annotations

from llamaops.operator import watch_scope
from llamaops.settings import Settings


def test_builtin_queue_watches_the_whole_cluster_for_its_gpu_accounting() -> None:
    assert watch_scope(Settings(queue_mode="builtin", namespaces=("team-a",))) == {"clusterwide": True}


def test_kueue_mode_watches_only_the_namespaces_it_serves() -> None:
    assert watch_scope(Settings(queue_mode="kueue", namespaces=("team-a", "team-b"))) == {
        "clusterwide": False, "namespaces": ["team-a", "team-b"]}
    assert watch_scope(Settings(queue_mode="kueue")) == {"clusterwide": True}
