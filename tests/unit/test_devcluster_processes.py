from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from llamaops_dev.devcluster import processes
from llamaops_dev.devcluster.net import port_in_use, wait_ports_free
from llamaops_dev.devcluster.processes import ProcessSpec


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def wait_for(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def start(tmp_path: Path, script: str):
    return processes.start(
        ProcessSpec("worker", ["sh", "-c", script]),
        log_file=tmp_path / "logs" / "worker.log",
        pid_file=tmp_path / "run" / "worker.pid",
        cwd=tmp_path,
    )


def test_start_writes_pid_file_and_log_in_own_group(tmp_path):
    proc = start(tmp_path, "echo hello from the worker; sleep 30")
    try:
        assert processes.read_pid(tmp_path / "run" / "worker.pid") == proc.pid
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        # The worker's own line, not the log's header (which quotes the command): until sh has run, the exec may
        # still be under way and /proc/<pid>/cmdline empty.
        wait_for(lambda: "hello from the worker" in (tmp_path / "logs" / "worker.log").read_text().splitlines())
        assert processes.is_running(proc.pid, "sh")
        # A live pid running another program is not ours.
        assert not processes.is_running(proc.pid, "etcd")
    finally:
        processes.stop([proc.pid], grace=2)
    assert not processes.is_running(proc.pid)


def test_stop_takes_the_whole_group(tmp_path):
    proc = start(tmp_path, "sleep 300 & sleep 300 & wait")
    wait_for(lambda: len(group_members(proc.pid)) == 3)
    assert processes.stop([proc.pid], grace=5) == []
    assert group_members(proc.pid) == []


def test_stop_kills_what_ignores_sigterm(tmp_path):
    proc = start(tmp_path, "trap '' TERM; sleep 300 & wait; sleep 300")
    wait_for(lambda: len(group_members(proc.pid)) == 2)
    started = time.monotonic()
    assert processes.stop([proc.pid], grace=0.5) == [proc.pid]
    assert time.monotonic() - started < 5
    assert group_members(proc.pid) == []


def test_exited_process_is_not_running(tmp_path):
    proc = start(tmp_path, "exit 3")
    wait_for(lambda: not processes.is_running(proc.pid))
    assert not processes.is_running(None)


def test_log_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = processes.log_tail(log, 30)
    assert tail.splitlines() == [f"line {i}" for i in range(70, 100)]
    assert "no log" in processes.log_tail(tmp_path / "missing.log")


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
        assert wait_ports_free([port], timeout=0.2) == [port]
    assert not port_in_use(port)
    assert wait_ports_free([port], timeout=1) == []
