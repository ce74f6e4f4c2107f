from __future__ import annotations

import dataclasses

import pytest
from llamaops_dev.devcluster import ClusterConfig, DevClusterError, NodePools, Ports
from llamaops_dev.devcluster.config import StateDir, default_home


def test_default_ports_avoid_a_real_clusters_ports():
    ports = Ports()
    used = {p for ps in ports.by_component().values() for p in ps}
    assert len(used) == 9
    assert not used & {2379, 2380, 6443, 10250, 10255, 10257, 10259}
    ports.validate()


def test_shifted_moves_every_port():
    base, moved = Ports(), Ports().shifted(100)
    assert moved.apiserver == base.apiserver + 100
    assert moved.etcd_peer == base.etcd_peer + 100
    assert moved.kwok == base.kwok + 100


def test_clusters_on_offsets_50_apart_share_no_port():
    # Test sessions run clusters at $LLAMAOPS_TEST_PORT_OFFSET plus 0, 50
    # (with Kueue), 100 and 200; engineers use offsets 100 apart.
    base = set(dataclasses.astuple(Ports()))
    for step in range(50, 1001, 50):
        assert not base & set(dataclasses.astuple(Ports().shifted(step))), step


def test_kueue_is_optional():
    assert "kueue" not in ClusterConfig().components()
    assert "kueue" not in ClusterConfig().component_ports()
    config = ClusterConfig(kueue=True)
    assert config.components()[-1] == "kueue"
    assert config.component_ports()["kueue"] == [Ports.kueue_health, Ports.kueue_webhook, Ports.kueue_metrics]


def test_port_clash_is_rejected():
    with pytest.raises(DevClusterError, match="16443"):
        Ports(etcd=16443).validate()


def test_node_pools_validation():
    NodePools().validate()
    with pytest.raises(DevClusterError):
        NodePools(gpu_nodes=0, cpu_nodes=0).validate()
    with pytest.raises(DevClusterError):
        NodePools(gpus_per_node=0).validate()


def test_config_round_trips_through_the_state_dir(tmp_path):
    state = StateDir(tmp_path)
    assert state.load_config() is None
    config = ClusterConfig(ports=Ports().shifted(7), nodes=NodePools(gpu_nodes=4, gpu_product="NVIDIA-A100-SXM4-80GB"), kueue=True)
    state.save_config(config)
    assert state.load_config() == config
    assert state.kubeconfig == tmp_path / "dev-cluster" / "kubeconfig"
    assert state.log_file("etcd") == tmp_path / "dev-cluster" / "logs" / "etcd.log"


def test_config_written_before_kueue_loads(tmp_path):
    state = StateDir(tmp_path)
    state.root.mkdir(parents=True)
    state.config_file.write_text("version: 1\nports: {apiserver: 20000}\nnodes: {gpu_nodes: 1}\n")
    config = state.load_config()
    assert config is not None and not config.kueue
    assert config.ports.apiserver == 20000 and config.ports.kueue_health == Ports.kueue_health


def test_overrides_replace_only_given_fields():
    config = ClusterConfig().with_overrides(ports={"apiserver": 20000, "etcd": None}, nodes={"cpu_nodes": 0, "gpu_nodes": None})
    assert config.ports.apiserver == 20000
    assert config.ports.etcd == Ports().etcd
    assert config.nodes.cpu_nodes == 0
    assert config.nodes.gpu_nodes == NodePools().gpu_nodes
    assert not config.kueue
    assert config.with_overrides(kueue=True).kueue
    assert config.with_overrides(kueue=True).with_overrides(kueue=None).kueue


def test_home_comes_from_llamaops_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMAOPS_HOME", str(tmp_path))
    assert default_home() == tmp_path
    monkeypatch.delenv("LLAMAOPS_HOME")
    assert default_home().name == ".llamaops"
