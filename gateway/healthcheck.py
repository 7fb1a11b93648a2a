"""`python -m pushgw.gateway.healthcheck`: the container image's HEALTHCHECK.

Asks `/healthz` and `/readyz` on 127.0.0.1:$PUSHGW_HEALTH_PORT (8080, the API's port, when unset; a worker
container sets its `worker.metrics_port`) and exits 0 when both answer 200, else 1 with the reason on
stderr. The standard library only: the image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

PATHS = ("/healthz", "/readyz")


def check(port: int, host: str = "127.0.0.1", timeout_s: float = 3.0) -> str | None:
    """None when every probe answers 200, else what failed."""
    for path in PATHS:
        url = f"http://{host}:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (OSError, ValueError) as e:
            return f"{url}: {e}"
        if status != 200:
            return f"{url}: HTTP {status}"
    return None


def main() -> int:
    raw = os.environ.get("PUSHGW_HEALTH_PORT", "8080")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        sys.stderr.write(f"PUSHGW_HEALTH_PORT must be a port number, got {raw!r}\n")
        return 1
    failure = check(int(raw))
    if failure:
        sys.stderr.write(f"unhealthy: {failure}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
