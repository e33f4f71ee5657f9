#!/usr/bin/env python3
"""A qscore service's container health check: GET http://127.0.0.1:$QSCORE_METRICS_PORT/healthz.

    qscore-healthcheck            # liveness (Docker's HEALTHCHECK, compose)
    qscore-healthcheck /readyz    # readiness: engine loaded, partitions assigned

Exits 0 when the endpoint answers 200, else 1 with the reason on stderr. Standard library only,
so any python3 in the image runs it; proxies are ignored (the service is on loopback).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def check(path: str, port: str | None) -> str | None:
    """None when http://127.0.0.1:port/path answers 200, else what went wrong."""
    if not port:
        return "QSCORE_METRICS_PORT is not set: the service serves no health endpoint"
    url = f"http://127.0.0.1:{port}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url}: {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    problem = check(path if path.startswith("/") else f"/{path}",
                    os.environ.get("QSCORE_METRICS_PORT"))
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
