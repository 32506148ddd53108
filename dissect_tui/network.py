"""Is a download host reachable? A seconds-long probe shared by every weights download.

Offline machines should fail in about a second with a message naming the file to fetch, not
after minutes of library retries (and not after a library has already printed "Downloading").
"""

from __future__ import annotations

import os
import socket
import threading

PROBE_TIMEOUT_S = 3.0


def proxy_configured() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def can_reach(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe of ``host``.

    DNS lookup has no timeout of its own, so it runs in a daemon thread we stop waiting for.
    Behind a proxy the direct probe means nothing, so we let the download try.
    """
    if proxy_configured():
        return True
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)
