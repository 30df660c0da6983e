"""Leases: a running extract's claim on feature spaces, so ``gc`` removes no row it may be about to reuse.

Layout::

    leases/<lease>/     attrs: spaces, renewed_at, created_by, pid, ttl_s

A lease is renewed every minute by a background thread and expires when not renewed for
``LEASE_TTL_S`` (10 minutes): a lease whose process is gone (killed, machine lost) stops
counting by itself, and ``gc`` removes it.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import zarr

from ..units import now_iso, parse_time
from .groups import child_groups, is_read_only, require_group

__all__ = ["Lease", "Leases", "LEASE_TTL_S", "created_by"]

LEASE_TTL_S = 600.0  # a lease not renewed for this long belongs to a process that is gone
_LEASE_RENEW_S = 60.0


def created_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class _NoLease:
    """What a reader of a store it cannot write holds instead of a lease: it writes nothing for gc to spare."""

    held = False

    def release(self) -> None:
        pass

    def __enter__(self) -> _NoLease:
        return self

    def __exit__(self, *exc) -> None:
        pass


class Lease:
    """A running extract's claim on spaces: gc leaves them alone while it is renewed."""

    held = True

    def __init__(self, parent: zarr.Group, name: str):
        self.parent, self.name = parent, name
        self.group = parent[name]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(_LEASE_RENEW_S):
            try:
                self.renew()
            except Exception:  # a renewal that fails leaves the lease to expire; the final re-check still runs
                pass

    def renew(self) -> None:
        self.group.attrs["renewed_at"] = now_iso()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            del self.parent[self.name]
        except Exception:  # gone already, or a store we cannot write: it expires by itself
            pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Leases:
    """The leases of one store root (a mixin of :class:`~featcache.store.Store`, beside :class:`~.rows.Rows`)."""

    url: str
    root: zarr.Group
    read_only: str | None  # why this process cannot write the store, once a write found out

    def lease(self, spaces: Iterable[str]) -> Lease | _NoLease:
        """Claim ``spaces`` for a running extract; ``gc`` removes no row of a claimed space.

        On a store this process cannot write (read access only, a read-only mount) there is no claim to
        make: ``read_only`` says why, and the caller may go on as long as it writes nothing."""
        try:
            parent, name = require_group(self.root, "leases"), uuid.uuid4().hex
            parent.create_group(name, attributes={"spaces": sorted(set(spaces)), "renewed_at": now_iso(),
                                                  "created_by": created_by(), "pid": os.getpid(), "ttl_s": LEASE_TTL_S})
        except OSError as e:
            if not is_read_only(e):
                raise
            self.read_only = f"{e.strerror or e.__class__.__name__}: {getattr(e, 'filename', None) or self.url}"
            return _NoLease()
        return Lease(parent, name)

    def leases(self) -> tuple[set[str], list[str]]:
        """Spaces claimed by live leases, and the names of expired or unreadable leases."""
        try:
            parent = self.root["leases"]
        except KeyError:
            return set(), []
        now = datetime.now(UTC)
        live: set[str] = set()
        stale: list[str] = []
        for name, group in child_groups(parent, None, "lease"):
            spaces = group.attrs.get("spaces")
            stamp = parse_time(group.attrs.get("renewed_at"))
            if stamp is None or not isinstance(spaces, list):
                stale.append(name)
                continue
            age = (now - stamp).total_seconds()
            if -LEASE_TTL_S < age < LEASE_TTL_S:
                live.update(s for s in spaces if isinstance(s, str))
            else:
                stale.append(name)
        return live, stale

    def remove_lease(self, name: str) -> None:
        del self.root["leases"][name]
