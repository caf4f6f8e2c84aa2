"""``python -m pytest_gpucloud.sim``: serve the simulated cloud until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading

from pydantic import ValidationError

from pytest_gpucloud.sim.config import DIALECTS, SimConfig
from pytest_gpucloud.sim.server import SimServer

_API = {
    "rest": "GPU cloud API",
    "lambda": "Lambda Cloud API",
    "runpod": "RunPod REST API v2",
    "lyceum": "Lyceum API",
}
# Where the dialect's base URL (the --gpu-api-url to use) is below the server's.
_PATH = {"rest": "", "lambda": "/api/v1", "runpod": "/v2", "lyceum": "/api/v2/external"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_gpucloud.sim",
        description="Serve a simulated GPU cloud whose instances run commands on this machine.",
    )
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", help="accept only this bearer token (default: any)")
    parser.add_argument("--boot-delay", type=float, default=0.2, metavar="S")
    parser.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="rest",
        help="the API it speaks: the project's REST API (default) or a vendor's",
    )
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a host other than loopback"
    )
    return parser


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.allow_remote or _is_loopback(args.host)):
        sys.exit(
            f"gpu-cloud sim: refusing to serve on {args.host}: its instances run any command "
            "on this machine; use a loopback host or pass --allow-remote"
        )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        config = SimConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            boot_delay_s=args.boot_delay,
            dialect=args.dialect,
        )
        server = SimServer(config)
        url = server.start()
    except (ValidationError, OSError) as exc:
        sys.exit(f"gpu-cloud sim: cannot serve on {args.host}:{args.port}: {exc}")
    print(
        f"gpu-cloud sim: serving the {_API[args.dialect]} on {url}{_PATH[args.dialect]} "
        "(instances run tests on this machine's CPU)",
        flush=True,
    )
    try:
        stopping.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
