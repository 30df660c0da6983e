"""Every option and argument of every command, given a bad value, is a usage error: exit
status 2, ``Invalid value for 'OPTION'`` and the values it takes, and nothing written.

The cases are generated from click's own description of the commands, so a new option is
covered by its type (Choice, IntRange, float range, Path) or fails ``test_every_parameter_has_bad_values``
until a case for it is written into ``FREE_TEXT`` below.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.cli.kit import Device, Fractions, OutputPath, StoreURL

from .helpers import TINY, make_folder

# Parameters whose values are free text: (command, parameter) → cases of (arguments, words the error must contain).
# Paths in the arguments: DATA is a good image folder, STORE a store with one set, FILE a regular file,
# FULL a non-empty folder.
FREE_TEXT: dict[tuple[str, str], list[tuple[list[str], list[str]]]] = {
    ("extract", "backbone"): [
        (["--backbone", "resnet81", "--data", "DATA"], ["closest: resnet18", "featcache backbones"]),
        (["--backbone", "nomodule:make", "--data", "DATA"], ["cannot import backbone factory"]),
    ],
    ("extract", "layer"): [
        (["--backbone", "resnet18", "--weights", "none", "--layer", "layer9", "--data", "DATA"],
         ["layer1", "layer4", "featcache layers resnet18"]),
        (["--backbone", "resnet18", "--weights", "none", "--layer", "layer3,layer9", "--data", "DATA"],
         ["Unknown layer 'layer9'", "featcache layers resnet18"]),
        (["--backbone", "resnet18", "--weights", "none", "--layer", "layer3,", "--data", "DATA"],
         ["a layer name or several, e.g. layer3,layer4"]),
        (["--backbone", "resnet18", "--weights", "none", "--layer", "layer3,layer3", "--data", "DATA"],
         ["names layer3 more than once"]),
    ],
    ("extract", "weights"): [
        (["--backbone", "resnet18", "--weights", "IMAGENET", "--data", "DATA"], ["DEFAULT", "IMAGENET1K_V1", "none"]),
        (["--backbone", "resnet18", "--weights", "FILE", "--data", "DATA"], ["cannot load weights", "plain state dicts"]),
        (["--backbone", "resnet18", "--weights", "missing.pth", "--data", "DATA"], ["DEFAULT", "none", "state-dict file"]),
    ],
    ("extract", "data"): [(["--backbone", TINY, "--data", "missing"], ["does not exist"])],
    ("extract", "ray_address"): [(["--backbone", TINY, "--data", "DATA", "--ray-address", "127.0.0.1:6379"],
                                  ["needs --engine ray"])],
    ("extract", "store"): [(["--backbone", TINY, "--data", "DATA", "--store", "FILE"], ["cannot create a featcache store"])],
    ("extract", "labels"): [
        (["--backbone", TINY, "--data", "DATA", "--labels", "missing.csv"], ["does not exist", "--labels PATH.csv"]),
        (["--backbone", TINY, "--data", "DATA", "--labels", "FILE"], ["needs a header row", "path", "label"]),
        (["--backbone", TINY, "--data", "DATA", "--labels", "FULL"], ["is a directory"]),
    ],
    ("extract", "labels_from_name"): [
        (["--backbone", TINY, "--data", "DATA", "--labels-from-name", "(a)(b)"], ["exactly one group", "has 2"]),
        (["--backbone", TINY, "--data", "DATA", "--labels-from-name", "(cat"], ["does not compile"]),
        (["--backbone", TINY, "--data", "DATA", "--labels-from-name", "^nomatch(x)"], ["no file name", "gives a label"]),
    ],
    ("extract", "classes"): [
        (["--backbone", TINY, "--data", "DATA", "--classes", "red,purple"], ["purple", "Classes found: blue, green, red"]),
        (["--backbone", TINY, "--data", "DATA", "--classes", "red"], ["leaves 1 of 3 classes", "at least 2"]),
        (["--backbone", TINY, "--data", "DATA", "--classes", "red,,blue"], ["class names like cats,dogs"]),
    ],
    ("extract", "exclude_class"): [
        (["--backbone", TINY, "--data", "DATA", "--exclude-class", "purple"], ["no such class", "Classes found"]),
        (["--backbone", TINY, "--data", "DATA", "--exclude-class", "red", "--exclude-class", "green"],
         ["leaves 1 of 3 classes"]),
    ],
    ("fit", "set_"): [(["--store", "STORE", "--set", "zzz"], ["Sets:", "featcache ls"])],
    ("fit", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("fit", "out"): [(["--store", "STORE", "--out", "FULL"], ["not an empty folder"])],
    ("fit", "freeze"): [(["--store", "STORE", "--head", "rest", "--backbone", TINY, "--freeze", "nolayer"],
                         ["matches no layer", "Layers: classifier.1, classifier.3"])],
    ("fit", "tracking_uri"): [(["--store", "STORE", "--tracking-uri", "mlruns"], ["needs --tracker"]),
                              (["--store", "STORE", "--tracker", "tensorboard", "--tracking-uri", "http://h:5000"],
                               ["a folder for its event files"])],
    ("fit", "backbone"): [(["--store", "STORE", "--head", "rest", "--backbone", "nomodule:make"], ["cannot import backbone factory"])],
    ("predict", "backbone"): [(["missing", "DATA", "--backbone", "resnet81"], ["closest: resnet18"])],
    ("predict", "weights"): [(["missing", "DATA", "--weights", "missing.pth"], ["does not exist", "state-dict file"])],
    ("export", "backbone"): [(["missing", "out.pt2", "--backbone", "nomodule:make"], ["cannot import backbone factory"])],
    ("export", "weights"): [(["missing", "out.pt2", "--weights", "missing.pth"], ["does not exist"])],
    ("verify", "backbone"): [(["--store", "STORE", "--backbone", "nomodule:make"], ["cannot import backbone factory"])],
    ("verify", "weights"): [(["--store", "STORE", "--weights", "missing.pth"], ["does not exist"])],
    ("report", "backbone"): [(["missing", "--backbone", "nomodule:make"], ["cannot import backbone factory"])],
    ("verify", "data"): [(["--store", "STORE", "--data", "missing", "--backbone", TINY], ["does not exist"])],
    ("evaluate", "run"): [(["missing"], ["not a featcache run directory"])],
    ("evaluate", "backbone"): [(["missing", "--data", "DATA", "--backbone", "resnet81"], ["closest: resnet18"])],
    ("evaluate", "weights"): [(["missing", "--data", "DATA", "--weights", "missing.pth"], ["does not exist"])],
    ("evaluate", "labels_from_name"): [
        (["missing", "--data", "DATA", "--labels-from-name", "(a)(b)"], ["exactly one group", "has 2"]),
    ],
    ("predict", "paths"): [(["missing", "DATA", "missing.png"], ["'missing.png' does not exist"])],
    ("predict", "run"): [(["missing", "DATA"], ["not a featcache run directory"])],
    ("export", "run"): [(["missing", "out.pt2"], ["not a featcache run directory"])],
    ("report", "run"): [(["missing"], ["not a featcache run directory"])],
    ("layers", "backbone"): [(["resnet81"], ["closest: resnet18"])],
    ("layers", "match"): [([TINY, "--match", "nothing*"], ["no layer of", "matches 'nothing*'", "Layers: features"])],
    ("ls", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("info", "key"): [(["zzz", "--store", "STORE"], ["Sets:"])],
    ("info", "set_"): [(["--set", "zzz", "--store", "STORE"], ["Sets:"])],
    ("rm", "set_"): [(["--set", "zzz", "--store", "STORE"], ["Sets:"])],
    ("verify", "set_"): [(["--set", "zzz", "--store", "STORE"], ["Sets:"])],
    ("fit", "data"): [(["--store", "STORE", "--data", "FULL"], ["no set made from", "--set KEY"])],
    ("info", "store"): [(["k", "--store", "missing.zarr"], ["no featcache store"])],
    ("rm", "key"): [(["zzz", "--store", "STORE"], ["Sets:"])],
    ("rm", "store"): [(["k", "--store", "missing.zarr"], ["no featcache store"])],
    ("gc", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("verify", "key"): [(["zzz", "--store", "STORE"], ["Sets:"])],
    ("verify", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("status", "set_"): [(["--set", "zzz", "--store", "STORE"], ["Sets:"])],
    ("status", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("status", "data"): [(["--store", "STORE", "--data", "missing"], ["does not exist"])],
    ("compact", "set_"): [(["--set", "zzz", "--store", "STORE"], ["Sets:"])],
    ("compact", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("migrate", "store"): [(["--store", "missing.zarr"], ["no featcache store"])],
    ("sample", "out"): [(["--out", "FULL"], ["not the sample folder"])],
    ("export", "out"): [(["missing", "missing/dir/x.pt2"], ["does not exist; create it first"])],
}

# Parameters whose bad values are by design not usage errors.
NOT_USAGE_ERRORS: dict[tuple[str, str], str] = {
    ("runs", "set_key"): "a filter: a key no run has lists no runs",
}


def _typed_bad_values(param: click.Parameter) -> list[tuple[str, list[str]]] | None:
    """Bad values and the words their error must contain, from the parameter's click type; None if free text.

    Classes of value: not a number, NaN and ±inf (alone and inside lists), out of range, huge (overflowing
    an int64 or a float's use), sizes that round to 0 bytes, a device this machine lacks, an empty path,
    output paths that are of the wrong kind or whose folder does not exist."""
    t = getattr(param.type, "inner", param.type)  # fit's comma lists: each value checked as one
    if isinstance(t, Device):
        out = [("bogus", ["'auto'", "'cpu'", "'cuda'"])]
        if not torch.cuda.is_available():
            out.append(("cuda", ["CUDA is not available", "auto, cpu"]))
        return out
    if isinstance(t, click.Choice):
        return [("bogus", [repr(c) for c in t.choices])]
    if isinstance(t, click.IntRange):
        assert t.max is not None, f"{param.name}: an integer option needs an upper bound (a huge value would overflow)"
        out = [("1.5", ["not a valid integer"]), ("abc", ["not a valid integer"]), ("nan", ["not a valid integer"]),
               (str(2**40 * 2**40), ["not in the range"]), (str(t.max + 1), ["not in the range"])]
        if t.min is not None:
            out.append((str(t.min - 1), ["not in the range"]))
        return out
    if isinstance(t, click.FloatRange):
        assert t.max is not None, f"{param.name}: a float option needs an upper bound (1e300 would overflow)"
        out = [("abc", ["not a valid float"]), ("nan", ["range"]), ("inf", ["range"]), ("-inf", ["range"]),
               ("1e300", ["not in the range"]), ("1e999", ["range"]), (str(t.max + 1), ["not in the range"])]
        if t.min is not None:
            out.append((str(t.min - 1), ["not in the range"]))
        return out
    if isinstance(t, Fractions):
        return [(v, ["two or three positive fractions", "sum to 1"]) for v in ("nan,nan", "0.5,nan", "0.9,0.3", "inf,-inf",
                                                                             "1,0", "0.5,0.25,0.125,0.125")] + \
            [("most,rest", ["fractions like 0.8,0.2"])]
    if t.name == "auto|NUMBER":
        return [(v, ["'auto'", "number"]) for v in ("0", "-1", "nan", "inf", "abc", "1e300")]
    if t.name == "auto|SIZE":
        return [(v, ["'auto'", "like 4GB"]) for v in ("0", "-1GB", "4XB", "nan", "inf", "lots", "0.5", "1e308TB")]
    if isinstance(t, StoreURL):
        return [("", ["empty store path"]), (" ", ["empty store path"])]
    if isinstance(t, OutputPath) and t.kind == "dir":
        return [("FILE", ["exists and is not a folder"]), ("/dev/null", ["exists and is not a folder"]), ("", ["empty path"])]
    if isinstance(t, OutputPath):
        return [("FULL", ["exists and is not a regular file"]), ("/dev/null", ["not a regular file"]),
                ("missing/dir/x", ["does not exist; create it first"]), ("", ["empty path"])]
    if isinstance(t, click.Path) and not t.file_okay:
        return [("FILE", ["is a file"])]
    if isinstance(t, click.Path) and not t.dir_okay:
        return [("FULL", ["is a directory"])]
    return None


def _has_no_values(param: click.Parameter) -> bool:
    return (isinstance(param, click.Option) and (param.is_flag or param.count)) or param.name in ("help", "version")


def _cases() -> list:
    cases = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            key = (name, param.name)
            if _has_no_values(param) or key in NOT_USAGE_ERRORS:
                continue
            typed = _typed_bad_values(param)
            entries = list(FREE_TEXT.get(key, []))
            if typed is not None:
                if isinstance(param, click.Option):
                    flag = [param.opts[0]]
                else:  # the arguments before it, with values click accepts
                    flag = ["missing" for p in command.params[: command.params.index(param)] if isinstance(p, click.Argument)]
                entries += [(flag + [value], words) for value, words in typed]
            if not entries:
                entries = [([], None)]  # reported by test_every_parameter_has_bad_values
            for args, words in entries:
                cases.append(pytest.param(name, param, args, words, id=f"{name}-{param.name}-{'_'.join(args)[-40:]}"))
    return cases


CASES = _cases()


def test_every_parameter_has_bad_values():
    missing = [f"{c.values[0]} {c.values[1].name}" for c in CASES if c.values[3] is None]
    assert not missing, f"add cases to FREE_TEXT or NOT_USAGE_ERRORS for: {', '.join(missing)}"
    assert len(CASES) > 250  # every command's options, each with every class of bad value its type has


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = make_folder(root / "data")
    store = root / "store.zarr"
    featcache.extract(backbone=TINY, layer="features", pool="none", weights="none", data=str(data), store=str(store),
                      workers=0)
    (root / "file.txt").write_text("not a folder, not a store, not a state dict")
    (root / "full").mkdir()
    (root / "full" / "mine.txt").write_text("keep me")
    return {"DATA": str(data), "STORE": str(store), "FILE": str(root / "file.txt"), "FULL": str(root / "full"), "root": root}


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("command,param,args,words", [c for c in CASES if c.values[3] is not None])
def test_bad_value_is_a_usage_error_naming_option_and_values(world, tmp_path, monkeypatch, command, param, args, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEATCACHE_STORE", raising=False)
    before = _snapshot(world["root"])
    argv = [command] + [world.get(a, a) for a in args]
    r = CliRunner().invoke(main, argv, catch_exceptions=False)
    label = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
    assert r.exit_code == 2, r.output
    hints = (label, f"[{label}]", f"{label}...") + (("--set",) if param.name == "key" else ())  # KEY is an alias of --set
    assert any(f"Invalid value for '{hint}'" in r.output for hint in hints), r.output
    for word in words:
        assert word in r.output, (word, r.output)
    assert "Traceback" not in r.output
    assert _snapshot(world["root"]) == before, "a rejected command changed files"
    assert not list(Path(tmp_path).iterdir()), os.listdir(tmp_path)  # nothing created in the working folder
