"""`python -m llamaops_dev.devnode`: run the dev node agent until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from llamaops_dev.devnode.agent import DEFAULT_PASS_ENV, Agent, AgentConfig
from llamaops_dev.devnode.node import NodeConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llamaops_dev.devnode",
        description="A Node whose pods run as local processes (dev/test tooling; see llamaops_dev/devnode/__init__.py).")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="default $KUBECONFIG")
    p.add_argument("--name", default="local-cpu", help="the Node's name (default local-cpu)")
    p.add_argument("--work-dir", required=True, type=Path,
                   help="pods' files live in WORK/pods/<namespace>/<pod>/ (logs: <container>.log)")
    p.add_argument("--pvc-dir", type=Path, default=None,
                   help="claims not bound to a hostPath PV: PVC_DIR/<namespace>/<claim> (default WORK/pvc)")
    p.add_argument("--cpu", default="", help="cpu capacity (default: this machine's CPUs)")
    p.add_argument("--memory", default="", help="memory capacity (default: this machine's memory)")
    p.add_argument("--pods", type=int, default=32, help="pod capacity (default 32)")
    p.add_argument("--python", default=sys.executable, help="the interpreter `python` means in a container")
    p.add_argument("--pass-env", action="append", default=None, metavar="NAME",
                   help=f"host variables pods inherit (repeatable; default {', '.join(DEFAULT_PASS_ENV)})")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from llamaops_dev.devnode.kube import Api

    config = AgentConfig(node=NodeConfig(args.name, args.cpu, args.memory, args.pods), work_dir=args.work_dir,
                         pvc_dir=args.pvc_dir, python=args.python,
                         pass_env=tuple(args.pass_env) if args.pass_env is not None else DEFAULT_PASS_ENV)
    api = Api(args.kubeconfig)
    agent = Agent(api, config)

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("llamaops_dev.devnode").info("signal %d: stopping the node's pods", signum)
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except Exception as exc:  # noqa: BLE001 - reported below, exit 1
            logging.getLogger("llamaops_dev.devnode").error("the agent stopped: %s", exc)
            failed.append(exc)

    runner = threading.Thread(target=run, name="agent", daemon=True)
    runner.start()
    while runner.is_alive() and not agent.stopping.is_set():
        runner.join(0.5)
    # The only shutdown (Agent.run leaves it to its caller): on a signal it stops the pods at once,
    # without waiting for the pod watch to return.
    agent.shutdown()
    runner.join(5)
    api.close()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
