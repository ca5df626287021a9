"""Command line: `exlogare-exporter --config FILE`, `--demo`, `--once`, `--check-config`; signals."""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from . import __version__, backfill
from .app import Exporter
from .config import Config, ConfigError, load_config, parse_listen_address
from .webconfig import WebConfig, load_web_config

log = logging.getLogger("exlogare_exporter")

CONFIG_ENV = "EXLOGARE_EXPORTER_CONFIG"
DEMO_LISTEN = "127.0.0.1:10450"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="exlogare-exporter",
        description="Prometheus exporter for the Exlogare Read API v1.")
    p.add_argument("--config", metavar="FILE", default=os.environ.get(CONFIG_ENV),
                   help=f"YAML config file (default: ${CONFIG_ENV})")
    p.add_argument("--listen", metavar="HOST:PORT", help="override listen_address from the config")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="TLS and basic auth for the HTTP endpoints (exporter-toolkit format); "
                        "re-read on SIGHUP")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit 0 or 1")
    p.add_argument("--once", action="store_true",
                   help="refresh every tenant once, print the exposition, exit non-zero if any failed")
    p.add_argument("--demo", action="store_true",
                   help=f"run against a built-in Exlogare simulator (listens on {DEMO_LISTEN})")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--version", action="version", version=f"exlogare-exporter {__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", title="commands (default: serve)")
    backfill.add_arguments(commands.add_parser(
        "backfill", help="print past per-day failure counts as OpenMetrics, for promtool tsdb "
                         "create-blocks-from openmetrics",
        description="Print the tenants' per-day failure history (up to 180 days) as OpenMetrics on stdout."))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .logs import setup_logging
    setup_logging(args.log_level, args.log_format)
    try:
        web = load_web_config(args.web_config_file) if args.web_config_file else None
    except ConfigError as exc:
        print(f"exlogare-exporter: web config error in {exc}", file=sys.stderr)
        return 1
    if args.demo:
        return _run_demo(args, web)
    if not args.config:
        print(f"exlogare-exporter: give --config FILE (or set {CONFIG_ENV}), or try --demo", file=sys.stderr)
        return 2
    try:
        config = _with_listen(load_config(args.config), args.listen)
    except ConfigError as exc:
        print(f"exlogare-exporter: config error in {args.config}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"exlogare-exporter: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        log.warning("config: %s", warning)
    if args.command == "backfill":
        return backfill.run(config, args)
    if args.check_config:
        print(f"{args.config}: OK, {len(config.tenants)} tenant(s): "
              + ", ".join(t.name for t in config.tenants))
        if web is not None:
            print(f"{args.web_config_file}: OK, TLS {'on' if web.tls else 'off'}, "
                  f"{len(web.users)} basic-auth user(s)")
        return 0
    exporter = Exporter(config, args.config, web, args.web_config_file)
    if args.once:
        return _once(exporter)
    return _serve(exporter)


def _with_listen(config: Config, listen: str | None) -> Config:
    if not listen:
        return config
    try:
        host, port = parse_listen_address(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    return replace(config, listen_host=host, listen_port=port)


def _once(exporter: Exporter) -> int:
    exposition, ok = exporter.run_once()
    sys.stdout.buffer.write(exposition)
    sys.stdout.flush()
    exporter.stop(wait=0)
    return 0 if ok else 1


def _serve(exporter: Exporter) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Signals are handled on the main thread."""
    events: queue.SimpleQueue[int] = queue.SimpleQueue()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: events.put(signum))
    try:
        exporter.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", exporter.config.listen_host, exporter.config.listen_port,
                  exc.strerror or exc)
        return 1
    while True:
        signum = events.get()
        if signum == signal.SIGHUP:
            exporter.reload()
            continue
        log.info("received %s, stopping", signal.Signals(signum).name)
        break
    clean = exporter.stop(wait=3.0)
    if not clean:
        # A refresh is blocked in a slow upstream call; its thread would hold the exit up to its timeout.
        log.warning("stopping without waiting for in-flight refreshes")
        logging.shutdown()
        os._exit(0)
    return 0


def _run_demo(args: argparse.Namespace, web: WebConfig | None) -> int:
    from .demo import start_demo

    demo = start_demo(args.listen or DEMO_LISTEN)
    exporter = Exporter(demo.config, web=web)
    if args.once:
        code = _once(exporter)
        demo.stop()
        return code
    print(f"Exlogare simulator: {demo.server.url} (tenants: {', '.join(demo.tenants)})", flush=True)
    base = f"{'https' if web and web.tls else 'http'}://{demo.config.listen_host}:{demo.config.listen_port}"
    print(f"Exporter metrics:   {base}/metrics", flush=True)
    print(f"Status page:        {base}/", flush=True)
    try:
        return _serve(exporter)
    finally:
        demo.stop()
