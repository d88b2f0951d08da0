"""The ``pe-node`` command line (DESIGN.md "Command line"): serve, worker, check, status, send, predict, resend.

Exit codes: 0 success, 1 the command ran and something failed (a refused send, a failed check), 2 bad usage or
an unusable configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pe_node import __version__
from pe_node.config import Config, ConfigError, load_config
from pe_node.logs import configure_logging
from pe_node.node import StartError

log = logging.getLogger("pe_node")

DEFAULT_CONFIG = Path("config.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"pe-node: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"pe-node: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pe-node", description="DICOM node for pulmonary embolism detection on CTPA")
    parser.add_argument("--version", action="version", version=f"pe-node {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, run: object, config: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if config:
            sub.add_argument("--config", type=Path, default=None,
                             help="config file (default: $PE_NODE_CONFIG, else ./config.yaml if present)")
        sub.set_defaults(run=run)
        return sub

    serve = command("serve", "receive, queue, analyse and deliver until SIGTERM/SIGINT", _serve)
    serve.add_argument("--no-worker", action="store_true", help="receive and queue only (workers run elsewhere)")
    command("worker", "analyse queued jobs and deliver results (no receiver)", _worker)
    command("check", "validate the config, C-ECHO each DICOM destination, load the model", _check)
    status = command("status", "series, jobs and deliveries with their states", _status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--audit", action="store_true", help="include the association audit")
    status.add_argument("--limit", type=int, default=200, help="rows per table (default 200)")
    send = command("send", "C-STORE files or folders to a DICOM node", _send, config=False)
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    send.add_argument("--to", required=True, metavar="AET@HOST:PORT", help="the receiving node")
    send.add_argument("--aet", default="PE_NODE", help="calling AE title (default PE_NODE)")
    predict = command("predict", "run the model on one series folder, without the network", _predict)
    predict.add_argument("path", type=Path, metavar="PATH")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    resend = command("resend", "queue a job's result objects for delivery again", _resend)
    resend.add_argument("job", type=int, metavar="JOB")
    return parser


def _config(args: argparse.Namespace) -> Config:
    path = args.config or (Path(os.environ["PE_NODE_CONFIG"]) if os.environ.get("PE_NODE_CONFIG") else None)
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    config = load_config(path)
    configure_logging(config.logging)
    return config


def _serve(args: argparse.Namespace) -> int:
    from pe_node.node import Node, Roles

    config = _config(args)
    work = config.worker.enabled and not args.no_worker
    Node(config, Roles(receive=True, work=work), worker_factory=_worker_factory() if work else None) \
        .run_until_signalled()
    return 0


def _worker(args: argparse.Namespace) -> int:
    from pe_node.node import Node, Roles

    config = _config(args)
    Node(config, Roles(receive=False, work=True), worker_factory=_worker_factory()).run_until_signalled()
    return 0


def _worker_factory():  # noqa: ANN202 - (Config, Database) -> Service
    from pe_node.worker import Worker

    return Worker.from_config


def _check(args: argparse.Namespace) -> int:
    from pe_node.check import run_checks

    config = _config(args)
    ok = True
    for result in run_checks(config):
        print(f"{'ok  ' if result.ok else 'FAIL'}  {result.name}: {result.detail}")
        ok &= result.ok
    return 0 if ok else 1


def _status(args: argparse.Namespace) -> int:
    from pe_node.db import Database
    from pe_node.status import collect, render

    config = _config(args)
    db = Database(config.database.url)
    try:
        report = collect(db, limit=args.limit, audit=args.audit)
    finally:
        db.dispose()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _send(args: argparse.Namespace) -> int:
    from pe_node.dicom.scu import Peer, collect_files, send_files

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        peer = Peer.parse(args.to)
        files = collect_files(args.paths)
    except (ValueError, FileNotFoundError) as exc:
        print(f"pe-node send: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("pe-node send: no files to send", file=sys.stderr)
        return 2
    results = send_files(files, peer, calling_ae_title=args.aet)
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = f"0x{r.status:04X}" if r.status is not None else "no status"
        print(f"failed  {r.path}: {status} {r.error or ''}", file=sys.stderr)
    print(f"sent {len(results) - len(failed)} of {len(results)} files to {peer}")
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from pe_node.predict import run_predict

    config = _config(args)
    return run_predict(args.path, config.model.checkpoint, config.model.device, config.model.batch_size, args.json)


def _resend(args: argparse.Namespace) -> int:
    from pe_node.db import Database
    from pe_node.delivery.outbox import resend_job

    config = _config(args)
    db = Database(config.database.url)
    try:
        count = resend_job(db, args.job)
    except LookupError as exc:
        print(f"pe-node resend: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    print(f"job {args.job}: {count} deliveries queued again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
