"""The shared store: feature spaces of content-addressed rows (:mod:`.rows`), the dataset views
over them (:mod:`.sets`, :mod:`.records`), opening and listing (:mod:`.store`), and looking after
it (:mod:`.maintenance`: status, verify, gc)."""

from .records import SetRecord
from .rows import (
    LEASE_TTL_S,
    Segment,
    SegmentWriter,
    created_by,
    default_compressor,
    group_bytes,
    is_read_only,
)
from .sets import FeatureSet
from .store import FORMAT_VERSION, Store, local_path, open_store, resolved_url

__all__ = [
    "FORMAT_VERSION",
    "LEASE_TTL_S",
    "Store",
    "FeatureSet",
    "SetRecord",
    "Segment",
    "SegmentWriter",
    "open_store",
    "local_path",
    "resolved_url",
    "default_compressor",
    "created_by",
    "group_bytes",
    "is_read_only",
]
