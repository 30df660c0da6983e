"""What an extract reports: one :class:`ExtractResult` per set made, :class:`LayersResult` for several layers
from one pass (one set each); their summary lines and ``--json`` documents."""

from __future__ import annotations

from dataclasses import dataclass

from .data import Skip
from .units import human_bytes


@dataclass
class ExtractResult:
    set_key: str
    space: str
    store: str
    splits: dict[str, int]
    extracted: int
    reused: int
    skipped: list[Skip]
    seconds: float
    bytes_stored: int
    bytes_raw: int
    timings: dict[str, float]
    shape: tuple[int, ...]
    views: int = 0
    views_extracted: int = 0
    set_bytes: int = 0
    layer: str | None = None

    @property
    def images(self) -> int:
        return sum(self.splits.values())

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    @property
    def cache_hit(self) -> bool:
        return self.extracted == 0 and self.views_extracted == 0

    def summary(self) -> str:
        """One line: the set, its images, what was computed, time, and the set's own bytes on disk."""
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        if self.cache_hit:
            work = f"nothing to compute ({self.reused} rows reused)"
        else:
            rate = f" ({self.images_per_s:.1f} images/s)" if self.extracted else ""
            work = f"extracted {self.extracted}{rate}, reused {self.reused}"
        skipped = f", skipped {len(self.skipped)}" if self.skipped else ""
        views = f"; {self.views} views per training image ({self.views_extracted} computed)" if self.views else ""
        where = ("in memory, gone when this process ends" if str(self.store).lower().startswith("memory://")
                 else "on disk")
        return (f"set {self.set_key}: {self.images} images ({splits}); {work}{skipped}{views}; {self.seconds:.1f} s; "
                f"{human_bytes(self.set_bytes)} {where}")

    def time_line(self) -> str | None:
        """Where the time went (``None`` when nothing was computed): with model processes, their
        seconds decoding and in the forward (summed over the processes) and this process's wait
        for them; else the wait for decoded images and the model; and the background writer."""
        t = self.timings
        if self.cache_hit or not t:
            return None
        if t.get("actors"):
            work = (f"{int(t['actors'])} Ray model actors; decode tasks {t.get('decode', 0.0):.1f} s, forward "
                    f"{t.get('forward', 0.0):.1f} s, write tasks {t.get('write', 0.0):.1f} s (summed over the cluster)")
            return f"time: {work}"
        if t.get("processes"):
            work = (f"{int(t['processes'])} model processes decoding {t.get('decode', 0.0):.1f} s and in the forward "
                    f"{t.get('forward', 0.0):.1f} s (summed), waited for {t.get('read', 0.0):.1f} s")
        else:
            work = f"waiting for decoded images {t.get('read', 0.0):.1f} s, model and checks {t.get('model', 0.0):.1f} s"
        return f"time: {work}; writer busy {t.get('write', 0.0):.1f} s (alongside)"

    def to_dict(self) -> dict:
        """The result as JSON values (``extract --json``)."""
        return {
            "set": self.set_key, "store": self.store, "space": self.space, "layer": self.layer,
            "splits": dict(self.splits),
            "images": self.images, "extracted": self.extracted, "reused": self.reused,
            "skipped": [s.to_dict() for s in self.skipped], "views": self.views, "views_extracted": self.views_extracted,
            "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 3), "shape": list(self.shape),
            "set_bytes": self.set_bytes, "space_bytes": self.bytes_stored, "space_bytes_raw": self.bytes_raw,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class LayersResult:
    """What ``extract(layer=[...])`` did: one :class:`ExtractResult` (one set) per layer, in the order asked."""

    results: list[ExtractResult]

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> ExtractResult:
        return self.results[i]

    @property
    def set_keys(self) -> list[str]:
        return [r.set_key for r in self.results]

    @property
    def skipped(self) -> list[Skip]:
        return self.results[0].skipped

    @property
    def seconds(self) -> float:
        return self.results[0].seconds

    @property
    def computed(self) -> int:
        """Images that went through the network (once, for every layer that missed them)."""
        return max(r.extracted for r in self.results)

    def summary(self) -> str:
        """One line per set (its layer first), then one for the pass they shared."""
        lines = [f"{r.layer}: {r.summary()}" for r in self.results]
        return "\n".join(lines + [f"{len(self.results)} layers, one pass: {self.computed} images through the "
                                   f"network in {self.seconds:.1f} s"])

    def to_dict(self) -> dict:
        """The result as JSON values (``extract --json``): each set's, and the pass they shared."""
        return {"sets": [r.to_dict() for r in self.results], "computed": self.computed,
                "seconds": round(self.seconds, 3)}
