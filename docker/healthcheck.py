"""The images' HEALTHCHECK: GET /health where `tablefree serve` listens.

The address comes from the server's own command line (PID 1 is `tini -- tablefree serve ARGS`,
ARGS being what follows the image name in `docker run`), else from TABLEFREE_PORT/TABLEFREE_HOST,
which the images set. Standard library only: it runs every 30 s and must start fast.
"""

import argparse
import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence

# A server bound to every address is reached on loopback.
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def served_url(cmdline: Sequence[str], env: Mapping[str, str]) -> str:
    """The /health URL of the server started by `cmdline` (argv of PID 1) with environment `env`."""
    args = list(cmdline)
    args = args[args.index("serve") + 1:] if "serve" in args else []
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--port", type=int, default=int(env["TABLEFREE_PORT"]))
    parser.add_argument("--host", default=env["TABLEFREE_HOST"])
    given, _ = parser.parse_known_args(args)
    host = WILDCARDS.get(given.host, given.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{given.port}/health"


def main() -> int:
    with open("/proc/1/cmdline", "rb") as f:
        cmdline = f.read().decode().split("\0")
    urllib.request.urlopen(served_url(cmdline, os.environ), timeout=4)  # raises unless 2xx
    return 0


if __name__ == "__main__":
    sys.exit(main())
