"""`up`, `down` and `status` of the local control plane.

    etcd -> kube-apiserver (/readyz) -> kube-controller-manager, kube-scheduler,
    kwok -> nodes Ready [-> Kueue's CRDs and RBAC -> kueue (/readyz)] -> kubeconfig path
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from llamaops_dev.devcluster import binaries, components, kubeconfig, kueue, nodes, pki, processes
from llamaops_dev.devcluster.config import ClusterConfig, StateDir
from llamaops_dev.devcluster.errors import DevClusterError
from llamaops_dev.devcluster.net import HOST, APIClient, APIError, http_ok, port_in_use, wait_ports_free

POLL = 0.1
LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class ComponentState:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    ports: list[int]
    log: Path


def _stderr(message: str) -> None:
    print(f"dev-cluster: {message}", file=sys.stderr, flush=True)


class DevCluster:
    """One local control plane, kept under `<home>/dev-cluster`.

    `home` defaults to `$LLAMAOPS_HOME` or `~/.llamaops`; `bin_dir` to
    `$LLAMAOPS_BIN_DIR` or the directory `hack/build-binaries.sh` prints.
    """

    def __init__(self, home: Path | str | None = None, *, bin_dir: Path | str | None = None, say: Callable[[str], None] = _stderr) -> None:
        self.state = StateDir(home)
        self._bin_dir = bin_dir
        self._say = say
        self._procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- queries

    @property
    def kubeconfig(self) -> Path:
        return self.state.kubeconfig

    def config(self) -> ClusterConfig:
        """The persisted configuration, else the defaults."""
        return self.state.load_config() or ClusterConfig()

    def _pid(self, name: str) -> int | None:
        return processes.read_pid(self.state.pid_file(name))

    def _running(self, name: str) -> bool:
        return processes.is_running(self._pid(name), name)

    def _client(self, config: ClusterConfig, timeout: float = 5.0) -> APIClient:
        p = pki.PKIPaths(self.state.pki)
        return APIClient(HOST, config.ports.apiserver, p.ca_cert, p.client_cert("admin"), p.client_key("admin"), timeout=timeout)

    def status(self) -> list[ComponentState]:
        config = self.config()
        by_component = config.ports.by_component()
        out = []
        for name in config.components():
            pid = self._pid(name)
            running = processes.is_running(pid, name)
            healthy = False
            if running:
                if name == "kube-apiserver":
                    healthy = self._apiserver_ready(config)
                else:
                    healthy = http_ok(components.health(name, config).url)
            out.append(ComponentState(name, pid, running, healthy, by_component[name], self.state.log_file(name)))
        return out

    def is_up(self) -> bool:
        """Every component of the configuration runs and the API server is ready."""
        config = self.config()
        if not all(self._running(n) for n in config.components()):
            return False
        return self._apiserver_ready(config)

    def _apiserver_ready(self, config: ClusterConfig) -> bool:
        if not pki.PKIPaths(self.state.pki).complete():
            return False
        try:
            return self._client(config, timeout=2.0).ready()
        except OSError:
            return False

    # ------------------------------------------------------------------- up

    def up(self, config: ClusterConfig | None = None, *, timeout: float = 120.0) -> Path:
        """Start the cluster (unless it is already up) and return its kubeconfig path.

        `config` defaults to the persisted one, else the defaults; it is
        persisted for the next `up`.
        """
        with self._lock():
            if self.is_up():
                running = self.config()
                self._say(f"already running; kubeconfig: {self.kubeconfig}")
                if config is not None and config != running:
                    self._say("the options given differ from the running cluster's; run `down` first to apply them")
                return self.kubeconfig
            if self._leftovers():
                self._say("found a stopped or broken dev cluster; cleaning it up")
                self._stop_all()
            config = config or self.config()
            config.validate()
            bin_dir = binaries.resolve(self._bin_dir)
            if config.kueue:
                kueue.check_binaries(bin_dir)
            self._check_ports(config)
            started = time.monotonic()
            try:
                self._start(config, bin_dir, timeout)
            except BaseException:
                self._say("start-up failed; stopping what was started")
                self._stop_all()
                raise
            extra = ", kueue" if config.kueue else ""
            self._say(f"ready in {time.monotonic() - started:.1f}s: {len(nodes.manifests(config.nodes))} nodes{extra}; kubeconfig: {self.kubeconfig}")
            return self.kubeconfig

    def _leftovers(self) -> bool:
        return any(self.state.pid_file(n).exists() for n in components.COMPONENTS) or any(
            self._running(n) for n in components.COMPONENTS
        )

    def _check_ports(self, config: ClusterConfig) -> None:
        taken = [(port, name) for name, ports in config.component_ports().items() for port in ports if port_in_use(port)]
        if taken:
            detail = ", ".join(f"{port} ({name})" for port, name in taken)
            noun, verb = ("port", "is") if len(taken) == 1 else ("ports", "are")
            raise DevClusterError(
                f"{noun} {detail} on {HOST} {verb} already in use; stop whatever holds it or pick other ports "
                "(see `llamaops dev-cluster up --help`: --port-offset and the --*-port options)"
            )

    def _reset_state(self, config: ClusterConfig) -> None:
        s = self.state
        s.root.mkdir(parents=True, exist_ok=True)
        for d in (s.etcd_data, s.logs, s.run, s.pki, s.component_configs):
            shutil.rmtree(d, ignore_errors=True)
        s.kubeconfig.unlink(missing_ok=True)
        for d in (s.logs, s.run, s.component_configs):
            d.mkdir(parents=True)
        s.etcd_data.mkdir(mode=0o700)
        s.save_config(config)

    def _spawn(self, spec: processes.ProcessSpec) -> None:
        proc = processes.start(spec, log_file=self.state.log_file(spec.name), pid_file=self.state.pid_file(spec.name), cwd=self.state.root)
        self._procs[spec.name] = proc

    def _check_alive(self) -> None:
        """Raise with the log tail of a component that exited."""
        for name, proc in self._procs.items():
            code = proc.poll()
            if code is not None:
                raise self._died(name, f"exited with code {code}")

    def _died(self, name: str, what: str) -> DevClusterError:
        return DevClusterError(f"{name} {what} during start-up; {self._tail(name)}")

    def _tail(self, name: str) -> str:
        log = self.state.log_file(name)
        tail = processes.log_tail(log, LOG_TAIL_LINES).rstrip("\n")
        return f"last lines of {log}:\n{tail}"

    def _wait(self, what: str, done: Callable[[], bool], deadline: float, blame: str) -> None:
        """Poll `done` until the deadline, failing early when a component exits."""
        while True:
            self._check_alive()
            if done():
                return
            if time.monotonic() >= deadline:
                raise DevClusterError(f"timed out waiting for {what}; {self._tail(blame)}")
            time.sleep(POLL)

    def _start(self, config: ClusterConfig, bin_dir: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._reset_state(config)
        paths = pki.generate(self.state.pki)
        components.write_component_files(self.state, config, paths)
        specs = components.specs(self.state, config, paths, bin_dir)

        self._say(f"starting etcd and kube-apiserver on {HOST}:{config.ports.apiserver} (binaries: {bin_dir})")
        self._spawn(specs["etcd"])
        etcd_health = components.health("etcd", config).url
        self._wait("etcd", lambda: http_ok(etcd_health), deadline, "etcd")
        self._spawn(specs["kube-apiserver"])
        client = self._client(config)
        self._wait("kube-apiserver /readyz", client.ready, deadline, "kube-apiserver")
        kubeconfig.write(
            self.state.kubeconfig, components.apiserver_url(config), paths.ca_cert, paths.client_cert("admin"), paths.client_key("admin"), "llamaops-admin"
        )

        client.create_or_replace("/apis/rbac.authorization.k8s.io/v1/clusterroles", components.KWOK_CLUSTER_ROLE)
        client.create_or_replace("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", components.KWOK_CLUSTER_ROLE_BINDING)
        self._say("starting kube-controller-manager, kube-scheduler and kwok")
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._spawn(specs[name])

        manifests = nodes.manifests(config.nodes)
        for node in manifests:
            client.create_or_replace("/api/v1/nodes", node)
        names = {n["metadata"]["name"] for n in manifests}

        def nodes_ready() -> bool:
            try:
                items = client.get("/api/v1/nodes").get("items", [])
            except (OSError, APIError, HTTPException):
                return False
            ready = {n["metadata"]["name"] for n in items if nodes.node_ready(n)}
            return names <= ready

        def default_service_account() -> bool:
            try:
                status, _ = client.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
            except (OSError, HTTPException):
                return False
            return status == 200

        self._say(f"waiting for {len(names)} nodes to become Ready")
        self._wait(f"nodes {sorted(names)} to be Ready and untainted", nodes_ready, deadline, "kwok")
        self._wait("the default service account", default_service_account, deadline, "kube-controller-manager")
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            url = components.health(name, config).url
            self._wait(f"{name} {url}", lambda url=url: http_ok(url), deadline, name)
        if config.kueue:
            self._start_kueue(config, bin_dir, paths, deadline)

    def _start_kueue(self, config: ClusterConfig, bin_dir: Path, paths: pki.PKIPaths, deadline: float) -> None:
        # The Workload CRD is 1.4 MB: give its apply more than the default 5s.
        client = self._client(config, timeout=60.0)
        self._say(f"installing Kueue's CRDs and RBAC (namespace {kueue.NAMESPACE})")
        crds = kueue.install(client, bin_dir)
        self._wait("Kueue's CRDs to be Established", lambda: kueue.crds_established(client, crds), deadline, "kube-apiserver")
        kueue.write_files(self.state, config, paths, components.apiserver_url(config))
        self._say(f"starting kueue (health {HOST}:{config.ports.kueue_health})")
        self._spawn(kueue.spec(self.state, bin_dir))
        url = components.health("kueue", config).url
        self._wait(f"kueue {url}", lambda: http_ok(url), deadline, "kueue")

    # ----------------------------------------------------------------- down

    def restart(self, name: str, *, grace: float = 10.0, timeout: float = 60.0) -> None:
        """Stop one component and start it again with the same configuration (a fault, for chaos tests): the
        API server comes back on the same etcd, so every object is still there."""
        config = self.config()
        paths = pki.PKIPaths(self.state.pki)
        specs = components.specs(self.state, config, paths, binaries.resolve(self._bin_dir))
        pid = self._pid(name)
        if processes.is_running(pid, name):
            processes.stop([pid], grace=grace)  # type: ignore[list-item]
        wait_ports_free(config.component_ports().get(name, ()), timeout=15)
        self._spawn(specs[name])
        if name == "kube-apiserver":
            self._wait("kube-apiserver /readyz", self._client(config).ready, time.monotonic() + timeout, name)

    def down(self, *, purge: bool = False, grace: float = 10.0) -> None:
        """Stop every component; with `purge` also remove the state directory."""
        if not self.state.root.exists():
            return
        with self._lock():
            self._stop_all(grace=grace)
            if purge:
                shutil.rmtree(self.state.root, ignore_errors=True)

    def _stop_all(self, grace: float = 10.0) -> None:
        pids: dict[str, int] = {}
        for name in components.COMPONENTS:
            pid = self._pid(name)
            if processes.is_running(pid, name):
                pids[name] = pid  # type: ignore[assignment]
        for name, proc in self._procs.items():
            if proc.poll() is None:
                pids[name] = proc.pid
        # Clients first, then the API server (it drains its requests, about
        # a second), then etcd: stopping etcd under a running API server
        # makes that one hang until it is killed.
        killed: list[str] = []
        for phase in components.STOP_PHASES:
            group = {n: pids[n] for n in phase if n in pids}
            if group:
                gone = processes.stop(group.values(), grace=grace)
                killed += [n for n, p in group.items() if p in gone]
        if killed:
            self._say(f"killed after {grace:.0f}s: {', '.join(killed)}")
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._procs.clear()
        config = self.config()
        ports = [p for ps in config.component_ports().values() for p in ps]
        if pids:
            still = wait_ports_free(ports, timeout=15)
            if still:
                self._say(f"ports still in use after stopping: {', '.join(map(str, still))}")
        for name in components.COMPONENTS:
            self.state.pid_file(name).unlink(missing_ok=True)

    # ----------------------------------------------------------------- lock

    @contextlib.contextmanager
    def _lock(self, timeout: float = 300.0) -> Iterator[None]:
        """One `up`/`down` at a time per state directory."""
        self.state.root.mkdir(parents=True, exist_ok=True)
        with open(self.state.lock_file, "a+") as f:
            deadline = time.monotonic() + timeout
            announced = False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not announced:
                        self._say(f"waiting for another dev-cluster command on {self.state.root}")
                        announced = True
                    if time.monotonic() >= deadline:
                        raise DevClusterError(f"another dev-cluster command holds {self.state.lock_file}") from None
                    time.sleep(POLL)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


__all__ = ["APIError", "ComponentState", "DevCluster"]
