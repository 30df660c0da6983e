"""The ``featcache`` command: a thin click layer over the library, one module per kind of command.

- :mod:`.kit`: the group that maps errors to ``Error:`` lines and usage errors, value types,
  shared options, output (imported first: it installs the Ctrl-C handler before anything else);
- :mod:`.main`: the program (``main``, ``run``) and the commands that work from images: extract,
  fit, backbones, layers, sample;
- :mod:`.runs`: the commands that use a run directory: runs, evaluate, predict, export, report;
- :mod:`.store`: the commands that read or tend a store: ls, info, rm, gc, verify, status,
  compact, migrate (none imports torch);
- :mod:`.docs`: ``docs/cli.md`` written from the commands' own help.

As in ``unittest``, the name ``featcache.cli.main`` is the program (the click group) once the
package is imported; the module itself is ``sys.modules["featcache.cli.main"]``
(``from featcache.cli.main import run`` works either way).
"""

from __future__ import annotations

from . import kit  # noqa: F401  first: the Ctrl-C handler
from .main import main, run
from .runs import evaluate_cmd, export_cmd, predict_cmd, report_cmd, runs_cmd
from .store import compact_cmd, gc_cmd, info_cmd, ls_cmd, migrate_cmd, rm_cmd, status_cmd, verify_cmd

__all__ = ["main", "run"]

for _command in (runs_cmd, evaluate_cmd, predict_cmd, export_cmd, report_cmd,
                 ls_cmd, info_cmd, rm_cmd, gc_cmd, verify_cmd, status_cmd, compact_cmd, migrate_cmd):
    main.add_command(_command)
