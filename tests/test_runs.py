"""Run directories damaged for real on disk: every command that reads a run says so in one
``Error:`` line (exit 1, or 2 when RUN is no run directory at all), never a traceback, never
exit 0 with wrong output."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
import featcache.persist
from featcache.cli import main
from featcache.errors import RunError
from featcache.runs import RUN_FILES, RunRecord
from featcache.tails import load_head

from .helpers import TINY, cli_imports, make_folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One mlp and one logreg run on the tiny backbone, fitted once for the whole module."""
    root = tmp_path_factory.mktemp("runs")
    folder = make_folder(root / "data")
    store = str(root / "store.zarr")
    featcache.extract(data=str(folder), store=store, backbone=TINY, weights="none", workers=0)
    torch_options = {"epochs": 20, "lr": 1e-2, "patience": 0}
    fitted = {head: featcache.fit(head=head, store=store, out=str(root / head), plots=False,
                                  **(torch_options if head == "mlp" else {})).run_dir
              for head in ("mlp", "logreg")}
    return {**fitted, "image": folder / "val" / "red" / "red_0.png"}


def _json(name, change):
    """Damage: rewrite ``name`` with ``change(doc)`` (in place when it returns None)."""
    def damage(run: Path) -> Path:
        path = run / name
        doc = json.loads(path.read_text())
        new = change(doc)
        path.write_text(json.dumps(doc if new is None else new))
        return run
    return damage


def _arrays(change):
    """Damage: rewrite head.npz with ``change(arrays)`` (in place when it returns None)."""
    def damage(run: Path) -> Path:
        with np.load(run / "head.npz") as z:
            arrays = {k: z[k] for k in z.files}
        new = change(arrays)
        np.savez(run / "head.npz", **(arrays if new is None else new))  # allow_pickle: object arrays get in
        return run
    return damage


def _metrics(change):
    """Damage: rewrite the metrics (metrics.json and the confusion_matrix.SPLIT.npy tables) with ``change(doc)``."""
    def damage(run: Path) -> Path:
        doc = json.loads((run / "metrics.json").read_text())
        for split, m in doc.items():
            m["confusion_matrix"] = np.load(run / f"confusion_matrix.{split}.npy").tolist()
        change(doc)
        for split, m in doc.items():
            np.save(run / f"confusion_matrix.{split}.npy", np.array(m.pop("confusion_matrix"), dtype=np.int64))
        (run / "metrics.json").write_text(json.dumps(doc))
        return run
    return damage


def _write_table(name, table):
    def damage(run: Path) -> Path:
        np.save(run / name, table, allow_pickle=True)
        return run
    return damage


def _delete(name):
    def damage(run: Path) -> Path:
        (run / name).unlink()
        return run
    return damage


def _truncate(name):
    def damage(run: Path) -> Path:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
        return run
    return damage


def _write(name, data: bytes):
    def damage(run: Path) -> Path:
        (run / name).write_bytes(data)
        return run
    return damage


def _drop_class(metrics):
    for m in metrics.values():
        last = list(m["per_class_accuracy"])[-1]
        del m["per_class_accuracy"][last]
        m["confusion_matrix"] = [row[:-1] for row in m["confusion_matrix"][:-1]]
        m["n"] = sum(map(sum, m["confusion_matrix"]))


def _add_class(metrics):
    for m in metrics.values():
        m["per_class_accuracy"]["purple"] = None
        m["confusion_matrix"] = [row + [0] for row in m["confusion_matrix"]] + [[0] * (len(m["confusion_matrix"]) + 1)]


def _set(path: str, value):
    """Change: set the dotted ``path`` of a JSON document to ``value``."""
    def change(doc):
        *parents, last = path.split(".")
        for key in parents:
            doc = doc[int(key) if isinstance(doc, list) else key]
        doc[last] = value
    return change


def _nan(name):
    def change(arrays):
        arrays[name] = arrays[name].astype(np.float64)
        arrays[name].flat[0] = np.nan
    return change


def _both(*damages):
    def damage(run: Path) -> Path:
        for d in damages:
            run = d(run)
        return run
    return damage


def _elsewhere(kind):
    def damage(run: Path) -> Path:
        target = run.parent / f"{run.name}-{kind}"
        if kind == "file":
            target.write_text("not a run")
        elif kind == "empty":
            target.mkdir()
        return target
    return damage


# (case, head, damage, exit status, words the Error line must contain besides the run)
CASES = [
    ("missing head.npz", "mlp", _delete("head.npz"), 1, ["head.npz is missing"]),
    ("missing head.json", "mlp", _delete("head.json"), 1, ["head.json is missing"]),
    ("missing history.json", "mlp", _delete("history.json"), 1, ["history.json is missing"]),
    ("missing metrics.json", "logreg", _delete("metrics.json"), 1, ["metrics.json is missing"]),
    ("missing config.json", "logreg", _delete("config.json"), 1, ["config.json is missing"]),
    ("truncated config.json", "mlp", _truncate("config.json"), 1, ["config.json is not valid JSON"]),
    ("truncated metrics.json", "mlp", _truncate("metrics.json"), 1, ["metrics.json is not valid JSON"]),
    ("truncated history.json", "mlp", _truncate("history.json"), 1, ["history.json is not valid JSON"]),
    ("truncated head.json", "logreg", _truncate("head.json"), 1, ["head.json is not valid JSON"]),
    ("truncated head.npz", "logreg", _truncate("head.npz"), 1, ["head.npz is not a valid .npz"]),
    ("head.npz is a pickle", "logreg", _write("head.npz", b"\x80\x04K\x01."), 1, ["head.npz is not a valid .npz"]),
    ("object array in head.npz", "logreg", _arrays(lambda a: {**a, "classes": np.array([0, 1, 2], dtype=object)}), 1,
     ["head.npz holds an object array"]),
    ("text array in head.npz", "mlp", _arrays(lambda a: {**a, "0.bias": np.array(["x"] * 256)}), 1,
     ["array '0.bias' has dtype <U1"]),
    ("transposed weights", "mlp", _arrays(lambda a: {**a, "0.weight": a["0.weight"].T}), 1,
     ["array '0.weight' has shape 32x256, expected 256x32"]),
    ("coef of the wrong width", "logreg", _arrays(lambda a: {**a, "coef": a["coef"][:, :-1]}), 1,
     ["array 'coef' has shape 3x31, expected 3x32"]),
    ("missing array", "mlp", _arrays(lambda a: {k: v for k, v in a.items() if k != "3.bias"}), 1,
     ["head.npz lacks array '3.bias'"]),
    ("extra array", "logreg", _arrays(lambda a: {**a, "payload": np.zeros(3)}), 1,
     ["head.npz has an unexpected array 'payload'"]),
    ("NaN coefficients", "logreg", _arrays(_nan("coef")), 1, ["array 'coef' holds non-finite values"]),
    ("inf weights", "mlp", _arrays(lambda a: {**a, "3.bias": np.full(3, np.inf, dtype=np.float32)}), 1,
     ["array '3.bias' holds non-finite values"]),
    ("zero scale", "logreg", _arrays(lambda a: {**a, "scaler_scale": np.zeros_like(a["scaler_scale"])}), 1,
     ["'scaler_scale' must be positive"]),
    ("classes 0..C-1 reordered", "logreg", _arrays(lambda a: {**a, "classes": a["classes"][::-1].copy()}), 1,
     ["'classes' must be 0..2"]),
    ("fewer classes", "mlp", _json("config.json", lambda d: {**d, "classes": d["classes"][:2]}), 1,
     ["metrics.json field 'train.per_class_accuracy' must be one entry per class of the run (2)"]),
    ("fewer classes, metrics to match", "mlp",
     _both(_json("config.json", lambda d: {**d, "classes": d["classes"][:2]}), _metrics(_drop_class)), 1,
     ["the head has 3 outputs but config.json names 2 classes"]),
    ("more classes, metrics to match", "logreg",
     _both(_json("config.json", lambda d: {**d, "classes": d["classes"] + ["purple"]}), _metrics(_add_class)),
     1, ["the head has 3 outputs but config.json names 4 classes"]),
    ("duplicate class names", "mlp", _json("config.json", _set("classes", ["red", "red", "blue"])), 1,
     ["config.json field 'classes' must be a non-empty list of distinct class names"]),
    ("head.json says 3 classes for 4", "mlp", _json("head.json", _set("fitted.n_classes", 4)), 1,
     ["array '3.weight' has shape 3x256, expected 4x256"]),
    ("head kind differs", "logreg",
     _json("head.json", lambda d: {**d, "kind": "svm", "params": {**d["params"], "kind": "svm"}}), 1,
     ["config.json field 'config.head' must be the kind of head.json ('svm')"]),
    ("unknown head kind", "mlp", _json("head.json", _set("kind", "os:system")), 1,
     ["head.json field 'kind' must be one of mlp"]),
    ("unknown head parameter", "mlp", _json("head.json", _set("params.evil", 1)), 1,
     ["head.json field 'params.evil'"]),
    ("hidden of the wrong type", "mlp", _json("head.json", _set("params.hidden", "256")), 1,
     ["head.json field 'params.hidden'"]),
    ("C differs from the head's", "logreg", _json("config.json", _set("C", 123.0)), 1,
     ["config.json field 'C' must be the C of head.json"]),
    ("a file passed as RUN", "mlp", _elsewhere("file"), 2, ["is not a featcache run directory (it is a file)"]),
    ("a missing RUN", "mlp", _elsewhere("missing"), 2, ["is not a featcache run directory (it does not exist)"]),
    ("an empty folder as RUN", "mlp", _elsewhere("empty"), 2, ["is not a featcache run directory"]),
    ("100k-deep list in config.json", "mlp", _write("config.json", b"[" * 100_000 + b"]" * 100_000), 1,
     ["config.json nests deeper than 64 levels"]),
    ("deep field in config.json", "mlp", _json("config.json", _set("preprocessing", json.loads("[" * 500 + "]" * 500))),
     1, ["config.json nests deeper than 64 levels"]),
    ("config.json not UTF-8", "mlp", _write("config.json", b'{"classes": "\xff\xfe"}'), 1,
     ["config.json is not UTF-8 text"]),
    ("config.json a list", "mlp", _write("config.json", b"[1, 2]"), 1, ["config.json must be a JSON object"]),
    ("history.json an object", "mlp", _write("history.json", b"{}"), 1, ["history.json must be a list"]),
    ("config.json a folder", "mlp", _both(_delete("config.json"), lambda r: (r / "config.json").mkdir() or r), 1,
     ["config.json is not a regular file"]),
    ("epochs as text", "mlp", _json("config.json", _set("config.epochs", "3")), 1,
     ["config.json field 'config.epochs' must be of type int"]),
    ("unknown fit option", "mlp", _json("config.json", _set("config.backdoor", True)), 1,
     ["config.json field 'config.backdoor'"]),
    ("pool out of choices", "logreg", _json("config.json", _set("config.pool", "median")), 1,
     ["field 'config' is not a valid FitConfig", "pool must be one of"]),
    ("feature shape as text", "mlp", _json("config.json", _set("feature_shape", "16x4x4")), 1,
     ["config.json field 'feature_shape'"]),
    ("input shape off", "mlp", _json("config.json", _set("input_shape", [63])), 1,
     ["config.json field 'input_shape' must be [32]"]),
    ("weights digest not hex", "mlp", _json("config.json", _set("weights.sha256", "../../etc/passwd")), 1,
     ["config.json field 'weights.sha256' must be 64 hex digits"]),
    ("stored dtype unknown", "mlp", _json("config.json", _set("space_provenance.dtype", "float8")), 1,
     ["config.json field 'space_provenance.dtype'"]),
    ("extract config of the wrong type", "logreg", _json("config.json", _set("extract_config.batch_size", "64")), 1,
     ["config.json field 'extract_config.batch_size' must be of type int"]),
    ("unknown run field", "mlp", _json("config.json", _set("run_this", "os:system")), 1,
     ["config.json field 'run_this'"]),
    ("counts off", "logreg", _json("metrics.json", _set("val.n", 99)), 1,
     ["metrics.json field 'val.confusion_matrix' must be counts adding up to n = 99"]),
    ("negative count", "mlp", _metrics(lambda m: m["val"]["confusion_matrix"][0].__setitem__(0, -1)), 1,
     ["confusion_matrix.val.npy holds negative counts"]),
    ("confusion matrix missing", "mlp", _delete("confusion_matrix.val.npy"), 1,
     ["confusion_matrix.val.npy is missing"]),
    ("confusion matrix of another size", "logreg", _write_table("confusion_matrix.val.npy", np.zeros((4, 4), np.int64)), 1,
     ["metrics.json field 'val.confusion_matrix' must be a 3x3 table of counts"]),
    ("confusion matrix of objects", "logreg", _write_table("confusion_matrix.val.npy", np.array([[None]], object)), 1,
     ["confusion_matrix.val.npy holds a object array"]),
    ("NaN top-1", "mlp", _write("metrics.json", b'{"val": {"n": 12, "top1": NaN}}'), 1,
     ["metrics.json field 'val.top1' must be a finite number"]),
    ("401-digit top-1", "logreg", _json("metrics.json", _set("val.top1", 10**400)), 1,
     ["metrics.json field 'val.top1' must be a finite number"]),
    ("401-digit C", "logreg", _json("head.json", _set("fitted.C", 10**400)), 1,
     ["head.json field 'fitted.C' must be a finite number > 0"]),
    ("401-digit learning rate", "mlp", _json("config.json", _set("config.lr", 10**400)), 1,
     ["config.json field 'config.lr' must be of type float"]),
    ("unknown split", "mlp", _json("metrics.json", _set("holdout", {})), 1, ["metrics.json field 'holdout'"]),
    ("epoch rows out of order", "mlp", _json("history.json", lambda h: h.reverse()), 1,
     ["history.json field '[0].epoch' must be 1"]),
    ("more epochs than configured", "mlp", _json("history.json", lambda h: h + h), 1,
     ["history.json must be a list of at most 20 epoch rows"]),
    ("C search scores missing", "logreg", _json("config.json", _set("C_search.scores", [0.5])), 1,
     ["config.json field 'C_search.scores' must be a list of", "numbers, one per grid value"]),
    ("epoch as true", "mlp", _json("history.json", _set("0.epoch", True)), 1,
     ["history.json field '[0].epoch' must be 1; got True"]),
    ("best epoch beyond history", "mlp", _json("config.json", _set("best_epoch", 21)), 1,
     ["config.json field 'best_epoch' must be at most the 20 epochs"]),
]
COMMANDS = {
    "evaluate": lambda run, runs, tmp: ["evaluate", run],
    "evaluate --json": lambda run, runs, tmp: ["evaluate", run, "--json"],
    "predict": lambda run, runs, tmp: ["predict", run, str(runs["image"]), "--backbone", TINY],
    "export": lambda run, runs, tmp: ["export", run, str(tmp / "model.pt2"), "--backbone", TINY],
    # with --data the report predicts the misclassified grid, so it builds the head
    "report": lambda run, runs, tmp: ["report", run, "--backbone", TINY, "--data", str(runs["image"].parents[2])],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case, head, damage, status, words", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_run_directory_is_one_error_line(runs, tmp_path, case, head, damage, status, words, command):
    run = damage(Path(shutil.copytree(runs[head], tmp_path / "run")))
    before = sorted(p.name for p in run.iterdir()) if run.is_dir() else None
    r = CliRunner().invoke(main, COMMANDS[command](str(run), runs, tmp_path))
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == status, r.output
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert str(run) in errors[0] and all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "model.pt2").exists() and not (tmp_path / "model.pt2.json").exists()
    assert (sorted(p.name for p in run.iterdir()) if run.is_dir() else None) == before  # nothing written into it


HEAD_CASES = [c[:3] for c in CASES if not c[4][0].startswith("config.json")
              and any(k in c[4][0] for k in ("head.npz", "head.json", "array '", "'scaler_scale'", "'classes' must"))]


@pytest.mark.parametrize("case, head, damage", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_load_head_refuses_a_damaged_head(runs, tmp_path, case, head, damage):
    run = damage(Path(shutil.copytree(runs[head], tmp_path / "run")))
    with pytest.raises(RunError, match="run"):
        load_head(run)


@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_a_healthy_run_reads_back_and_every_command_works(runs, tmp_path, head):
    run = Path(shutil.copytree(runs[head], tmp_path / "run"))
    record = featcache.read_run(run)
    assert isinstance(record, RunRecord) and record.classes == ("blue", "green", "red")
    assert record.to_dict() == json.loads((run / "config.json").read_text())
    stored = json.loads((run / "metrics.json").read_text())
    for split, m in stored.items():  # the confusion matrices are arrays beside the JSON
        m["confusion_matrix"] = np.load(run / f"confusion_matrix.{split}.npy", allow_pickle=False).tolist()
    assert record.metrics == stored
    record.write(tmp_path / "again")
    assert featcache.read_run(tmp_path / "again") == record
    tables = [f"confusion_matrix.{split}.npy" for split in record.metrics]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted([*RUN_FILES, *tables])
    runner = CliRunner()
    r = runner.invoke(main, ["evaluate", str(run)])
    assert r.exit_code == 0 and f"run {run}: head {head} on set {record.set}" in r.output
    r = runner.invoke(main, ["predict", str(run), str(runs["image"]), "--top-k", "1", "--backbone", TINY])
    assert r.exit_code == 0 and r.output.startswith(f"{runs['image']}  red "), r.output
    assert runner.invoke(main, ["export", str(run), str(tmp_path / "m.pt2"), "--backbone", TINY]).exit_code == 0
    pytest.importorskip("matplotlib")
    assert runner.invoke(main, ["report", str(run), "--backbone", TINY]).exit_code == 0


def test_a_run_with_non_finite_weights_is_never_written(runs, tmp_path):
    record = featcache.read_run(runs["logreg"])
    arrays = {**record.head.arrays, "coef": np.full_like(record.head.arrays["coef"], np.nan)}
    broken = dataclasses.replace(record, head=dataclasses.replace(record.head, arrays=arrays))
    (tmp_path / "out").mkdir()
    with pytest.raises(RunError, match="array 'coef' holds non-finite values"):
        broken.write(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_oversized_run_file_is_refused_before_it_is_parsed(runs, tmp_path, monkeypatch):
    run = Path(shutil.copytree(runs["mlp"], tmp_path / "run"))
    monkeypatch.setattr(featcache.persist, "MAX_JSON_BYTES", 10_000)  # stands in for 64 MB
    (run / "history.json").write_text(json.dumps([{"epoch": 1}] * 1000))
    r = CliRunner().invoke(main, ["evaluate", str(run)])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {run}: history.json is ") and "over the" in r.output


@pytest.fixture(scope="module")
def rest_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest")
    folder = make_folder(root / "data")
    store = str(root / "store.zarr")
    featcache.extract(data=str(folder), store=store, backbone=TINY, layer="features", weights="none", workers=0)
    run = featcache.fit(head="rest", store=store, out=str(root / "rest"), epochs=1, plots=False, backbone=TINY).run_dir
    return run, folder / "val" / "red" / "red_0.png"


@pytest.mark.parametrize("case, damage, commands, words", [
    ("NaN in a pretrained layer", _arrays(_nan("classifier.1.weight")), list(COMMANDS),
     "array 'classifier.1.weight' holds non-finite values"),
    ("new layer for 4 classes", _arrays(lambda a: {**a, "classifier.3.weight": np.zeros((4, 32), np.float32)}),
     list(COMMANDS), "array 'classifier.3.weight' has shape 4x32, expected 3xN"),
    # the rest of the network is only known once it is built: commands that build it refuse it
    ("a pretrained array missing", _arrays(lambda a: {k: v for k, v in a.items() if k != "classifier.1.bias"}),
     ["predict", "export", "report"], "head.npz does not fit the rest head's network"),
])
def test_a_damaged_rest_head_is_one_error_line(rest_run, tmp_path, case, damage, commands, words):
    run = damage(Path(shutil.copytree(rest_run[0], tmp_path / "run")))
    before = sorted(p.name for p in run.iterdir())
    for command in commands:
        r = CliRunner().invoke(main, COMMANDS[command](str(run), {"image": rest_run[1]}, tmp_path))
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, (command, r.output)
        assert str(run) in errors[0] and words in errors[0], (command, errors[0])
    assert sorted(p.name for p in run.iterdir()) == before
    with pytest.raises(RunError, match=words.replace("(", r"\(")):
        load_head(run, TINY)


LISTED_CASES = [c for c in CASES if c[3] == 1]  # a file or nothing passed as RUN is no run folder to list
NUMERIC_STACK = ("numpy", "torch", "sklearn", "scipy", "zarr", "tensorstore")


def _expected_row(run: Path) -> dict:
    """A good run's row of ``featcache runs --json``, read from its JSON files here."""
    info, metrics = (json.loads((run / f).read_text()) for f in ("config.json", "metrics.json"))
    params = json.loads((run / "head.json").read_text())["params"]
    shown = (f"lr={params['lr']:g} hidden={params['hidden']} dropout={params['dropout']:g}"
             if info["config"]["head"] == "mlp" else f"C={info['C']:g}")
    return {"time": info["created_at"], "run": run.name, "head": info["config"]["head"], "set": info["set"],
            "params": shown, "best_epoch": info.get("best_epoch"), "val_top1": metrics["val"]["top1"],
            "test_top1": metrics["test"]["top1"] if "test" in metrics else None}


def test_runs_lists_and_names_every_damage_without_numpy(runs, tmp_path):
    """``featcache runs`` over two good runs and one damaged copy per case above, in a process as a user runs
    it: each damaged run is skipped with the words every other command gives, each good row is what its files
    say, and neither NumPy nor anything built on it (torch, scikit-learn, zarr) is imported."""
    root = tmp_path / "runs"
    good = [Path(shutil.copytree(runs[head], root / f"good-{head}")) for head in ("mlp", "logreg")]
    for i, (_, head, damage, _, _) in enumerate(LISTED_CASES):
        damage(Path(shutil.copytree(runs[head], root / f"bad-{i:02d}")))
    code, imported, out, err = cli_imports(["runs", "--runs", root], NUMERIC_STACK, cwd=tmp_path)
    assert code == 0, err
    assert imported == [], imported
    skipped = dict(line.removeprefix("skipped ").split(": ", 1) for line in err.splitlines()
                   if line.startswith("skipped "))
    for i, (case, _, _, _, words) in enumerate(LISTED_CASES):
        reason = skipped.get(f"bad-{i:02d}", "")
        assert str(root / f"bad-{i:02d}") in reason and all(w in reason for w in words), (case, reason)
    assert err.splitlines()[-1] == f"2 runs in {root}, {len(LISTED_CASES)} damaged skipped", err
    lines = out.splitlines()
    assert lines[0].split() == ["time", "run", "head", "set", "params", "best", "epoch", "val", "top-1", "test", "top-1"]
    assert sorted(line.split()[1] for line in lines[1:]) == ["good-logreg", "good-mlp"], out
    code, imported, out, err = cli_imports(["runs", "--runs", root, "--json"], NUMERIC_STACK, cwd=tmp_path)
    assert (code, imported) == (0, []), err
    assert sorted(json.loads(out), key=lambda r: r["run"]) == [_expected_row(run) for run in sorted(good)]
