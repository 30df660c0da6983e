"""``python -m featcache.cli``: the ``featcache`` program (also under ``torchrun -m featcache.cli``)."""

from . import run

run()
