"""Shared fixtures.

Cluster tests run against the cluster named by $KUBECONFIG when it is set
(kind, a real cluster); otherwise against the local control plane
(`llamaops_dev.devcluster`), started once per session under a temporary
LLAMAOPS_HOME on ports shifted by $LLAMAOPS_TEST_PORT_OFFSET (default 100, so
a dev cluster on the default ports can keep running), and stopped at the end.
Binaries come from $LLAMAOPS_BIN_DIR, else hack/build-binaries.sh.

`kueue_cluster` is a cluster with Kueue: the $KUBECONFIG one if Kueue is
installed there, else a second local control plane started with Kueue.

Every test under tests/cluster, and every test using the `cluster` or
`kueue_cluster` fixture, carries the `cluster` marker: `pytest -m "not cluster"` runs without one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubetest import fresh_namespace

REPO = Path(__file__).resolve().parents[1]
CLUSTER_TESTS = REPO / "tests" / "cluster"
TEST_PORT_OFFSET_ENV = "LLAMAOPS_TEST_PORT_OFFSET"


def pytest_report_header(config: pytest.Config) -> str:
    value = os.environ.get("KUBECONFIG")
    if value:
        return f"cluster tests: the cluster of KUBECONFIG={value}"
    return "cluster tests: a local control plane (llamaops_dev.devcluster) started for this session"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.path))
        fixtures = getattr(item, "fixturenames", ())
        if CLUSTER_TESTS in path.parents or "cluster" in fixtures or "kueue_cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)


def foreign_kubeconfig() -> Path | None:
    """The first file named by $KUBECONFIG, when it is set."""
    value = os.environ.get("KUBECONFIG", "")
    paths = [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    for p in paths:
        if p.is_file():
            return p
    if paths:
        raise pytest.UsageError(f"KUBECONFIG={value} names no existing file")
    return None


@dataclass(frozen=True)
class Cluster:
    """The cluster under test."""

    kubeconfig: Path
    # True for the local control plane started by this session.
    local: bool
    # Local control plane only: its LLAMAOPS_HOME, binaries and configuration.
    home: Path | None = None
    bin_dir: Path | None = None
    config: object | None = None  # llamaops_dev.devcluster.ClusterConfig


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """The control-plane binaries ($LLAMAOPS_BIN_DIR, else built by hack/build-binaries.sh)."""
    from llamaops_dev.devcluster import DevClusterError, binaries

    try:
        return binaries.resolve()
    except DevClusterError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    kubeconfig = foreign_kubeconfig()
    if kubeconfig is not None:
        yield Cluster(kubeconfig=kubeconfig, local=False)
        return

    from llamaops_dev.devcluster import ClusterConfig, Ports

    config = ClusterConfig(ports=Ports().shifted(int(os.environ.get(TEST_PORT_OFFSET_ENV, "100"))))
    yield from _local_cluster(request, tmp_path_factory, config, "llamaops-home")


def _local_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, config: object,
                   home_name: str) -> Iterator[Cluster]:
    """A local control plane for the session, under a temporary LLAMAOPS_HOME."""
    from llamaops_dev.devcluster import DevCluster, DevClusterError

    binaries = request.getfixturevalue("bin_dir")
    home = tmp_path_factory.mktemp(home_name)
    dev = DevCluster(home, bin_dir=binaries)
    try:
        path = dev.up(config, timeout=180)
    except DevClusterError as exc:
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    try:
        yield Cluster(kubeconfig=path, local=True, home=home, bin_dir=binaries, config=config)
    finally:
        dev.down()


@pytest.fixture(scope="session")
def kubeconfig(cluster: Cluster) -> Path:
    return cluster.kubeconfig


# The Kueue cluster's ports: above the session cluster's, below the launcher
# tests' throwaway clusters (+100, +200).
KUEUE_PORT_OFFSET_STEP = 50
KUEUE_CRD = "workloads.kueue.x-k8s.io"


def _has_kueue(kubeconfig: Path) -> bool:
    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.client.exceptions import ApiException

    with kube_config.new_client_from_config(config_file=str(kubeconfig)) as api:
        try:
            client.ApiextensionsV1Api(api).read_custom_resource_definition(KUEUE_CRD)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
    return True


@pytest.fixture(scope="session")
def kueue_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster running Kueue: the one $KUBECONFIG names when Kueue is
    installed there (skips when it is not), else a second local control plane
    started with `kueue=True` on ports shifted by $LLAMAOPS_TEST_PORT_OFFSET + 50."""
    kubeconfig = foreign_kubeconfig()
    if kubeconfig is not None:
        if not _has_kueue(kubeconfig):
            pytest.skip(
                f"the cluster of KUBECONFIG={kubeconfig} has no Kueue (no CRD {KUEUE_CRD}); "
                "install Kueue there, or unset KUBECONFIG to test against a local control plane with Kueue"
            )
        yield Cluster(kubeconfig=kubeconfig, local=False)
        return

    from llamaops_dev.devcluster import ClusterConfig, Ports

    offset = int(os.environ.get(TEST_PORT_OFFSET_ENV, "100")) + KUEUE_PORT_OFFSET_STEP
    config = ClusterConfig(ports=Ports().shifted(offset), kueue=True)
    yield from _local_cluster(request, tmp_path_factory, config, "llamaops-kueue-home")


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited with {self.returncode}:\n{self.stderr or ''}{self.stdout or ''}"


class Kubectl:
    """`kubectl --kubeconfig <cluster> ...`, returning the CompletedProcess (text)."""

    def __init__(self, binary: str, kubeconfig: Path, cache_dir: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir

    def __call__(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:  # noqa: A002
        cmd = [self.binary, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc


@pytest.fixture(scope="session")
def kubectl(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    """kubectl from $LLAMAOPS_BIN_DIR (or the local cluster's binaries), else from PATH."""
    candidates = []
    if os.environ.get("LLAMAOPS_BIN_DIR"):
        candidates.append(Path(os.environ["LLAMAOPS_BIN_DIR"]) / "kubectl")
    if cluster.bin_dir is not None:
        candidates.append(cluster.bin_dir / "kubectl")
    binary = next((str(c) for c in candidates if os.access(c, os.X_OK)), None) or shutil.which("kubectl")
    if binary is None:
        pytest.skip("no kubectl: set LLAMAOPS_BIN_DIR or put kubectl on PATH")
    return Kubectl(binary, cluster.kubeconfig, tmp_path_factory.mktemp("kube-cache"))


@pytest.fixture(scope="session")
def k8s(cluster: Cluster) -> Iterator[object]:
    """A `kubernetes.client.ApiClient` for the cluster under test."""
    from kubernetes import config as kube_config

    api = kube_config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace(k8s: object, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test (see fresh_namespace)."""
    with fresh_namespace(k8s, request.node.name) as name:
        yield name
