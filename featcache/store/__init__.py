"""The shared store: feature spaces of content-addressed rows (:mod:`.rows` the index, :mod:`.segments`
how rows lie on disk, :mod:`.groups` defensive group access and the commit marker, :mod:`.leases`), the dataset views
over them (:mod:`.sets`, :mod:`.records`; their rows as NumPy, torch, pandas or Hugging Face data in
:mod:`.convert` and :mod:`.torchdata`), opening and listing (:mod:`.store`), and looking after it
(:mod:`.maintenance`: gc and compact; :mod:`.migrate`)."""

from .groups import default_compressor, group_bytes, is_read_only
from .leases import LEASE_TTL_S, created_by
from .records import SetRecord
from .segments import Segment, SegmentWriter
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
