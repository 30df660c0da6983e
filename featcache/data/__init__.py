"""Image folders as people download them: layouts, safe decoding, and the hashed manifest.

``layouts`` finds splits, classes and labels (``labels`` says what names and label files
mean, ``walk`` lists the folders); ``images`` opens and decodes one file safely;
``manifest`` hashes the files (``scancache`` remembers the hashes of files whose stat signature
has not changed) and makes the stable seeded split; ``columns`` holds the result as arrays (the
manifest a re-run plans from, at a few dozen bytes per image). The names below are the
package's public API (the rest of featcache imports them from here).
"""

from .images import (
    DECODE_RECIPE,
    IMAGE_EXTENSIONS,
    ImageTooLarge,
    NotRegularFile,
    check_size,
    decode_bytes,
    is_image_name,
    load_rgb,
    open_regular,
)
from .labels import (
    CSV_NAMES,
    read_labels_csv,
    split_of,
)
from .layouts import Layout, find_layout
from .manifest import Item, Manifest, hash_file, safe_join, scan
from .walk import Skip

__all__ = [
    "DECODE_RECIPE",
    "IMAGE_EXTENSIONS",
    "ImageTooLarge",
    "NotRegularFile",
    "check_size",
    "decode_bytes",
    "is_image_name",
    "load_rgb",
    "open_regular",
    "CSV_NAMES",
    "Layout",
    "Skip",
    "find_layout",
    "split_of",
    "read_labels_csv",
    "Item",
    "Manifest",
    "hash_file",
    "safe_join",
    "scan",
]
