"""Hub names with no network fail in seconds, not minutes.

Hugging Face's client retries a hub it cannot reach with growing pauses (77-131 s of
``Retrying in 8s`` lines before the error for ``hf:google/vit-base-patch16-224`` or
``timm:resnet18.a1_in1k`` on a machine without a network). Before a hub name is loaded, one TCP
connection to the hub's endpoint (or the proxy) is tried for a few seconds; when it fails, the
load runs in the client's offline mode for its duration, so a model already in the local cache
still loads and one that is not fails at once, with a message that says how to load it from a
folder instead. ``HF_HUB_OFFLINE=1`` skips the probe (the client's own switch).
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

__all__ = ["PROBE_SECONDS", "hub_reachable", "offline_unless_reachable", "offline_hint"]

PROBE_SECONDS = 3.0  # a hub that answers at all connects within this; a missing network fails sooner (DNS)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _target() -> tuple[str, int]:
    """(host, port) that a hub request connects to first: the HTTPS proxy when one is set, else the endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    return url.hostname or "huggingface.co", port


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether one TCP connection to the hub (or its proxy) opens within ``timeout`` seconds.

    Name resolution has no timeout of its own, so the attempt runs in a daemon thread."""
    host, port = _target()
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, name="featcache-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def offline_unless_reachable() -> bool:
    """Put the hub client in its offline mode (local cache only) when the hub cannot be reached.

    Returns True when offline (asked for with ``HF_HUB_OFFLINE``, or the hub did not answer). The
    switch stays for the rest of the process (and its model processes): the hub will not come back
    within one command."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return True
    if hub_reachable():
        return False
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub, transformers and timm
    os.environ["HF_HUB_OFFLINE"] = "1"  # and by any process started from this one
    return True


def offline_hint(name: str, folder_form: str) -> str:
    """What to do when ``name`` is not in the local cache and the hub cannot be reached."""
    return (f"the Hugging Face hub cannot be reached from here and {name} is not in the local cache. Download it "
            f"where there is a network (hf download {name} --local-dir DIR) and pass {folder_form}, or copy that "
            "machine's Hugging Face cache here and set HF_HUB_OFFLINE=1")
