"""Find splits, classes and labels in an image folder, laid out the way datasets are downloaded.

In the spirit of torchvision's ``ImageFolder`` and Hugging Face's ``imagefolder`` builder:

* split folders are recognised by name, in any case, below any single wrapper folders
  (``train``, ``training``, ``training_set``, ``val``, ``valid``, ``validation``, ``dev``,
  ``test``, ``test_set``, ``testing``, ``eval``, ``test1``...), also when a split folder
  wraps one more folder of the same name (``training_set/training_set``);
* labels come from class folders, from the file names (``cat.0.jpg`` → ``cat``), or from a
  CSV (``path,label`` or ``file_name,label``; ``metadata.csv``/``labels.csv`` is found by itself);
* a split whose images have no labels (``test1/1.jpg``) is kept, unlabelled;
* files outside the layout are listed as ignored; a Zarr store's folder is never data;
* anything ambiguous is refused with the fix: two folders for one split, class folders named
  like splits, fewer than two classes.

Nothing here reads an image's bytes: :mod:`.manifest` hashes what this finds. What names
and label files mean is in :mod:`.labels`; the listings come from :mod:`.walk`.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..choices import DEFAULT_NAME_PATTERN, SPLITS
from ..config import parse_classes, parse_name_pattern
from ..errors import DataError
from .labels import CSV_NAMES, is_store_dir, labels_by_pattern, read_labels_csv, split_of
from .paths import Paths
from .walk import Finder, Skip, base_name, path_order, rel_path

__all__ = ["Skip", "Layout", "find_layout"]

_SHOWN_CLASSES = 10


@dataclass(frozen=True)
class Layout:
    """What was found in a folder: which files, in which split, with which label (-1: none)."""

    root: Path
    kind: str  # "splits" (split folders or split names in the CSV) or "flat" (to be split by fractions)
    labels_from: str  # "folders", "names" or "csv"
    sources: tuple[tuple[str, str], ...]  # (folder relative to root, split; "" when flat)
    classes: tuple[str, ...]
    files: tuple[tuple[str, int, Sequence[str]], ...]  # (split, label index or -1, files relative to root)
    unlabelled: tuple[str, ...] = ()
    ignored: tuple[Skip, ...] = ()
    skipped: tuple[Skip, ...] = ()
    excluded: tuple[str, ...] = ()
    labels_file: str | None = None
    name_pattern: str | None = None

    def describe(self, split_note: str = "") -> str:
        """One line: ``layout: split folders training_set/training_set (train), ...; 2 classes: cats, dogs``."""
        def where(folder: str, split: str) -> str:
            extra = ", unlabelled" if split in self.unlabelled else ""
            return f"{folder or '.'} ({split}{extra})"

        if self.labels_from == "csv":
            splits = [s for s in SPLITS if any(s == sp for sp, _ in self.sources)]
            parts = [f"labels from {self.labels_file}" + (
                f", splits {', '.join(s + (' (unlabelled)' if s in self.unlabelled else '') for s in splits)}"
                if splits else "")]
        elif self.kind == "splits":
            parts = ["split folders " + ", ".join(where(f, s) for f, s in self.sources)]
        else:
            folder = self.sources[0][0] if self.sources else ""
            what = "images" if self.labels_from == "names" else "class folders"
            parts = [f"{what} in {folder}" if folder else f"{what}, no split folders"]
        if self.labels_from == "names":
            parts.append(f"labels from file names ({self.name_pattern})")
        if split_note:
            parts.append(split_note)
        shown = ", ".join(self.classes[:_SHOWN_CLASSES])
        more = f", ... ({len(self.classes) - _SHOWN_CLASSES} more)" if len(self.classes) > _SHOWN_CLASSES else ""
        parts.append(f"{len(self.classes)} classes: {shown}{more}")
        if self.excluded:
            parts.append(f"excluded: {', '.join(self.excluded)}")
        if self.ignored:
            n = len(self.ignored)
            parts.append(f"{n} file{'s' if n != 1 else ''} ignored (listed in the set's 'ignored')")
        if self.skipped:
            n = len(self.skipped)
            parts.append(f"{n} name{'s' if n != 1 else ''} not valid UTF-8, skipped")
        return "layout: " + "; ".join(parts)


def _labels_by_name(paths: Sequence[str], pattern: str) -> dict[str | None, list[str]]:
    out: dict[str | None, list[str]] = {}
    for p, label in zip(paths, labels_by_pattern(pattern, [base_name(p) for p in paths])):
        out.setdefault(label, []).append(p)
    return out


def _from_csv(finder: Finder, csv_path: Path) -> tuple[str, list[tuple[str, str, dict]]]:
    rows = read_labels_csv(csv_path, finder.root)
    labels: dict[str, str | None] = {}
    groups: dict[str, dict[str | None, list[str]]] = {}
    for split, label, full in rows:
        rel = full.relative_to(finder.root).as_posix()  # as the walk names files
        if rel in labels and labels[rel] != label:
            raise DataError(f"{csv_path} gives {rel_path(full, finder.root)} two labels ({labels[rel]}, {label}); "
                            "keep one row per file", param="labels")
        if rel in labels:
            continue
        labels[rel] = label
        if split is None:  # the first folder of the path may name the split (train/0001.jpg)
            first = Path(os.path.relpath(os.path.abspath(full), os.path.abspath(csv_path.parent))).parts[0]
            split = split_of(first) if first != Path(full).name else None
        groups.setdefault(split or "", {}).setdefault(label, []).append(rel)
    if "" in groups and len(groups) > 1:
        raise DataError(f"{csv_path} mixes files in split folders with files outside them; "
                        "give every row a split (a split column, or paths under train/, val/, test/)",
                        param="labels")
    csv_rel = rel_path(csv_path, finder.root)
    for p in finder.images_below(finder.root):
        if p not in labels:
            finder.ignore(p, f"not listed in {csv_path.name}")
    finder.ignored = [k for k in finder.ignored if k.path != csv_rel]
    return ("flat" if "" in groups else "splits"), [(s, "", g) for s, g in groups.items()]


def _composed(group: dict[str | None, Sequence[str]], where: Path) -> dict[str | None, Sequence[str]]:
    """The group with its class names in Unicode's composed form (NFC): ``café`` is one class whether a
    folder or a CSV writes its é as one character or as e plus an accent (macOS writes the latter), so a
    split written on one system and one on another agree. Two names in one split that differ only so look
    identical to anyone: refused, naming both."""
    out: dict[str | None, Sequence[str]] = {}
    seen: dict[str, str] = {}
    for label, paths in group.items():
        name = unicodedata.normalize("NFC", label) if label is not None else None
        if name is not None and name in seen:
            raise DataError(f"{where}: the classes {seen[name]!r} ({seen[name]!a}) and {label!r} ({label!a}) "
                            "are the same name written with other Unicode characters (one composed, one decomposed); "
                            "they would be two classes that look identical. Merge them into one folder (or one label), "
                            "or rename one")
        if name is not None:
            seen[name] = label
        out[name] = paths  # as given (a folder's :class:`~.paths.Paths`): no string per file made here
    return out


def _split_folders(finder: Finder, base: Path, dirs: list[Path]) -> list[tuple[str, Path]]:
    """Each split's folder below ``base`` (unwrapping ``training_set/training_set``); two for one split is refused."""
    found: dict[str, list[Path]] = {}
    for d in dirs:
        split = split_of(d.name)
        if split is None:
            finder.ignore(d, "folder outside the split folders")
        else:
            found.setdefault(split, []).append(d)
    for split, folders in found.items():
        if len(folders) > 1:
            names = " and ".join(f"{d.name}/" for d in folders)
            raise DataError(f"two folders for the {split} split in {base}: {names}. Keep one: merge them, "
                            f"or move or rename the other so that it is not read as a split.")
    out = []
    for split in SPLITS:
        if split not in found:
            continue
        folder = found[split][0]
        while True:
            images, others, inner = finder.list(folder, record=False)
            if images or len(inner) != 1 or split_of(inner[0].name) != split:
                break
            finder.ignore_all(others, "outside the split folders")
            folder = inner[0]
        out.append((split, folder))
    return out


def _by_folders(finder: Finder, folder: Path) -> dict[str | None, Sequence[str]]:
    """Class folders of ``folder``; loose images with no class folders beside them are unlabelled."""
    images, others, dirs = finder.list(folder)
    finder.ignore_all(others, "outside the class folders")
    if not dirs:
        return {None: images} if images else {}
    finder.ignore_all(images, "image outside the class folders")
    return {d.name: finder.images_below(d) for d in dirs}


def _descend(finder: Finder, root: Path, csv_path: Path | None) -> tuple[Path, Path | None, list[Path]]:
    """Go down single wrapper folders until split folders, a labels CSV, images or several folders appear."""
    base = root
    while True:
        images, others, dirs = finder.list(base, record=False)
        if csv_path is None:
            csv_path = next((base / base_name(p) for p in others if base_name(p).lower() in CSV_NAMES), None)
        if csv_path is not None or any(split_of(d.name) for d in dirs) or images or len(dirs) != 1:
            return base, csv_path, dirs
        inner_images, _, inner_dirs = finder.list(dirs[0], record=False)
        if inner_images or not inner_dirs:  # a single class folder is not a wrapper
            return base, csv_path, dirs
        finder.ignore_all(others, "outside the layout")
        base = dirs[0]


def _shown(names: Sequence[str]) -> str:
    more = f", ... ({len(names) - _SHOWN_CLASSES} more)" if len(names) > _SHOWN_CLASSES else ""
    return ", ".join(names[:_SHOWN_CLASSES]) + more


def _parent_hint(folder: Path) -> str:
    """``--data PARENT`` when the parent holds several folders, as a class folder's parent does."""
    parent = folder.absolute().parent
    try:
        siblings = [d for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".") and not is_store_dir(d)]
    except OSError:
        siblings = []
    return f" If {folder} is one class of a larger set, pass the folder that holds the class folders: --data {folder.parent}." \
        if len(siblings) >= 2 else ""


def _no_labels(folder: Path, root: Path, group: dict, how: str, pattern: str | None, csv_path: Path | None,
               flat: bool) -> DataError:
    loose = len(group.get(None, []))
    by_name = sorted(k for k in _labels_by_name(group.get(None, []), DEFAULT_NAME_PATTERN) if k is not None)
    if how == "names":
        return DataError(f"no file name in {folder} gives a label with --labels-from-name {pattern!r} (cat.0.jpg → cat); "
                         "pass a regular expression whose one group captures the label", param="labels_from_name")
    if how == "csv":
        return DataError(f"{csv_path} gives no label to the training images; fill its label column", param="labels")
    if loose and 2 <= len(by_name) <= loose // 2:  # names that repeat, like cat.0.jpg, cat.1.jpg
        return DataError(f"no class folders in {folder}: its {loose} images are not sorted into class folders, but "
                         f"their names give the labels {_shown(by_name)}. Add --labels-from-name to use them.")
    if loose:
        return DataError(f"no class folders in {folder}: its {loose} images are not sorted into class folders. Label "
                         "them by file name (--labels-from-name: cat.0.jpg → cat) or with a CSV (--labels labels.csv), "
                         "or pass the folder that holds the class folders as --data."
                         + (_parent_hint(folder) if flat else ""))
    return DataError(f"no class folders in {folder}. Expected {root}/train/CLASS/IMAGE (with val/ or valid/) or "
                     f"{root}/CLASS/IMAGE with --split 0.8,0.2, or labels from file names (--labels-from-name) or a "
                     "CSV (--labels); see docs/layouts.md.")


def _resolve(finder: Finder, root: Path, base: Path, kind: str, how: str, groups: list, pattern: str | None,
             csv_path: Path | None) -> tuple[list[str], list[tuple[str, int, Sequence[str]]], list[str]]:
    """Class names (from the training files), labelled entries, and the splits that have no labels."""
    first = "" if kind == "flat" else "train"
    by_split = {s: (root / f if f else root, g) for s, f, g in groups}
    if first not in by_split:
        folders = ", ".join(f"{f}/" for _, f, _ in groups)
        raise DataError(f"{base} has split folders ({folders}) but none to train on. Add a train/ folder "
                        "(train, training or training_set) beside them.")
    folder, train = by_split[first]
    names = sorted(k for k in train if k is not None)
    if not names:
        raise _no_labels(folder, root, train, how, pattern, csv_path, kind == "flat")
    bad = [n for n in names if split_of(n)] if how == "folders" else []
    if bad:
        raise DataError(f"class folders in {folder} look like split folders: {', '.join(bad)}. Pass the folder that "
                        f"holds the split folders as --data, or rename these class folders.")
    index = {n: i for i, n in enumerate(names)}
    no_label = {"names": f"file name gives no label ({pattern})", "csv": "no label in the labels file"}.get(how, "")
    entries: list[tuple[str, int, Sequence[str]]] = []
    unlabelled: list[str] = []
    for split, _, group in groups:
        labelled = {k: v for k, v in group.items() if k is not None}
        loose = list(group.get(None, []))
        if split != first and how == "names" and labelled and not set(labelled) & set(names):
            loose, labelled = sorted((p for v in group.values() for p in v), key=path_order), {}  # test1/1.jpg
        if split != first and labelled:
            if how == "folders" and sorted(labelled) != names:
                only_train, only_here = sorted(set(names) - set(labelled)), sorted(set(labelled) - set(names))
                raise DataError(f"class folders differ between train and {split}: only in train: {only_train or '-'}; "
                                f"only in {split}: {only_here or '-'}. Every split needs the same class folders.")
            unknown = sorted(set(labelled) - set(names))
            if unknown:
                raise DataError(f"the {split} split has labels that train does not: {_shown(unknown)}. Every label "
                                "of val and test must be a training class; fix the labels or remove those images.")
        if labelled:
            finder.ignore_all(loose, no_label)
            entries += [(split, index[n], paths if isinstance(paths, Paths) else tuple(paths))
                        for n, paths in labelled.items()]
        elif loose:
            unlabelled.append(split)
            entries.append((split, -1, tuple(loose)))
    return names, entries, unlabelled


def _filter(names: list[str], classes: tuple[str, ...] | None, exclude: tuple[str, ...] | None) -> list[str]:
    keep = list(names)
    for chosen, param in ((classes, "classes"), (exclude, "exclude_class")):
        unknown = [c for c in chosen or () if c not in names]
        if unknown:
            raise DataError(f"--{param.replace('_', '-')} {', '.join(unknown)}: no such class here. Classes found: "
                            f"{_shown(names)}", param=param)
    if classes is not None:
        keep = [n for n in keep if n in classes]
    return [n for n in keep if n not in (exclude or ())]


def _check_two(keep: list[str], names: list[str], folder: Path, how: str, pattern: str | None,
               csv_path: Path | None, param: str) -> None:
    if len(keep) >= 2:
        return
    if len(names) >= 2:
        raise DataError(f"--{param.replace('_', '-')} leaves {len(keep)} of {len(names)} classes "
                        f"({', '.join(keep) or 'none'}); a classifier needs at least 2", param=param)
    if how == "names":
        raise DataError(f"every file name in {folder} gives the label {names[0]!r} with --labels-from-name {pattern!r}; "
                        "a classifier needs at least 2 classes. Pass a regular expression whose one group captures "
                        "the label", param="labels_from_name")
    if how == "csv":
        raise DataError(f"{csv_path} gives every training image the label {names[0]!r}; a classifier needs at least "
                        "2 classes", param="labels")
    inner = folder / names[0]
    nested = [d for d in inner.iterdir() if d.is_dir() and not d.name.startswith(".")] if inner.is_dir() else []
    hint = f"pass the folder that holds the class folders: --data {inner}" if len(nested) >= 2 else "add a folder per class"
    raise DataError(f"only one class folder ({names[0]}) in {folder}: a classifier needs at least 2; {hint}.")


def find_layout(
    root: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    labels_from_name: str | None = None,
    classes: str | Sequence[str] | None = None,
    exclude_class: Sequence[str] = (),
) -> Layout:
    """Find the splits, classes and labelled files in ``root`` (nothing is read but names)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist. Pass --data DIR (default: data/).", param="data")
    pattern = parse_name_pattern(labels_from_name)
    csv_path = Path(labels) if labels is not None else None
    if csv_path is not None and not csv_path.is_file():
        raise DataError(f"labels file {str(csv_path)!r} does not exist or is not a file. Pass --labels PATH.csv "
                        "(a header row, then path,label rows).", param="labels")
    finder = Finder(root)
    base, csv_path, dirs = _descend(finder, root, csv_path)
    if csv_path is not None:
        kind, groups = _from_csv(finder, csv_path)
        how = "csv"
    else:
        how = "names" if pattern else "folders"
        found = _split_folders(finder, base, dirs) if any(split_of(d.name) for d in dirs) else []
        if found:
            kind = "splits"
            images, others, _ = finder.list(base)
            finder.ignore_all(images + others, "outside the split folders")
            folders = found
        else:
            kind, folders = "flat", [("", base)]
        groups = []
        for split, folder in folders:
            group = _labels_by_name(finder.images_below(folder), pattern) if pattern else _by_folders(finder, folder)
            groups.append((split, rel_path(folder, root) if folder != root else "", group))
    groups = [(split, folder, _composed(group, root / folder if folder else root)) for split, folder, group in groups]
    names, entries, unlabelled = _resolve(finder, root, base, kind, how, groups, pattern, csv_path)
    chosen = parse_classes(classes)
    keep = _filter(names, chosen, parse_classes(exclude_class or None, "exclude_class"))
    train_folder = next((root / f if f else root for s, f, _ in groups if s in ("", "train")), base)
    _check_two(keep, names, train_folder, how, pattern, csv_path,
               "classes" if chosen is not None and sum(n in chosen for n in names) < 2 else "exclude_class")
    new_index = {old: keep.index(names[old]) for old in range(len(names)) if names[old] in keep}
    kept = tuple((s, new_index[i] if i >= 0 else -1, p) for s, i, p in entries if i < 0 or i in new_index)
    return Layout(
        root=root, kind=kind, labels_from=how, sources=tuple((f, s) for s, f, _ in groups), classes=tuple(keep),
        files=kept, unlabelled=tuple(unlabelled), ignored=tuple(finder.ignored), skipped=tuple(finder.skipped),
        excluded=tuple(n for n in names if n not in keep), labels_file=rel_path(csv_path, root) if csv_path else None,
        name_pattern=pattern,
    )
