"""Is the Hugging Face hub reachable? Asked once per process, in at most a few seconds.

Offline, the hub libraries retry every download for a minute or more before they give up. Every
hub load in rayreward passes `local_files_only=offline()`: a model in the local cache still loads
at once, and a missing one fails at once with a message that says where to put it.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def _reachable() -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except (OSError, TypeError):
        return False


def offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub endpoint does not answer within 3 s."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or not _reachable()


def why_offline() -> str:
    """A phrase for error messages: why only the local cache was looked at."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return "HF_HUB_OFFLINE is set, so only the local hub cache was looked at"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return f"the hub ({host}) does not answer from this machine, so only the local hub cache was looked at"
