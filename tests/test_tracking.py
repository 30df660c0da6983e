"""``fit --tracker``: what MLflow and TensorBoard hold is read back with their own readers and
compared with the run directory (config.json, history.json, metrics.json, the PNGs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.config import FitConfig
from featcache.heads import head_params
from featcache.runs import RunRecord
from featcache.sweep import sweep
from featcache.tails import load_head
from featcache.tracking import MLflowTracker, final_metrics, param_value

from .helpers import TINY, make_folder

PLOTS = ["confusion.png", "curves.png", "misclassified.png", "per_class.png"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    data = make_folder(root / "data", classes={"a": (200, 30, 30), "b": (200, 30, 30), "c": (30, 30, 200)})
    store = str(root / "s.zarr")
    featcache.extract(backbone=TINY, data=str(data), store=store, weights="none", workers=0)
    return {"data": str(data), "store": store}


def _files(run: Path) -> tuple[dict, list[dict], dict]:
    config = json.loads((run / "config.json").read_text())["config"]
    return config, json.loads((run / "history.json").read_text()), json.loads((run / "metrics.json").read_text())


def _final(run: Path) -> dict[str, float]:
    record = RunRecord.read(run)
    return final_metrics(type("R", (), {"metrics": record.metrics, "best_epoch": record.best_epoch,
                                        "chosen_C": record.C})())


def _mlflow(tmp_path: Path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens its file store only when asked
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    return client, client.get_experiment_by_name("featcache").experiment_id


def grouped_tag(name: str) -> str:
    """TensorBoard's tag of a metric: ``train_loss`` -> ``loss/train``, ``val_top1`` -> ``top1/val``."""
    split, _, rest = name.partition("_")
    return f"{rest}/{split}" if split in ("train", "val", "test") else {"seconds": "time/epoch_seconds"}.get(name, name)


def _head_params(config: dict) -> dict:
    """What a tracker logs as parameters: the head and the parameters it takes, nothing else."""
    return {"head": config["head"], **{k: config[k] for k in head_params(config["head"]) if k in config}}


def _check_mlflow_run(client, run_id: str, run: Path) -> None:
    config, history, metrics = _files(run)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == run.name
    assert got.data.params == {k: param_value(v) for k, v in _head_params(config).items()}
    assert got.data.tags["featcache.run_dir"] == str(run.resolve())
    for key in (k for k in (history[0] if history else {}) if k != "epoch"):
        logged = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in logged] == [(row["epoch"], row[key]) for row in history], key
    final = {k: v for k, v in got.data.metrics.items() if not (history and k in history[0])}
    assert final == _final(run)
    for split, m in metrics.items():
        assert final[f"{split}_top1"] == m["top1"] and final[f"{split}_log_loss"] == m["log_loss"]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == [f"plots/{p}" for p in
                                                                      sorted(q.name for q in run.glob("*.png"))]
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/head.json", "model/head.npz"]


def test_mlflow_run_holds_config_epochs_metrics_and_plots_and_changes_nothing(world, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = featcache.fit(head="mlp", store=world["store"], epochs=4, runs=str(tmp_path / "runs"), data=world["data"],
                        tracker="mlflow")
    assert (tmp_path / "mlruns").is_dir()  # beside runs/
    assert res.notes[-1] == (f"tracked in MLflow experiment featcache at {(tmp_path / 'mlruns').as_uri()} (see: "
                             f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri "
                             f"{(tmp_path / 'mlruns').as_uri()})")
    client, experiment = _mlflow(tmp_path, monkeypatch)
    (only,) = client.search_runs([experiment])
    _check_mlflow_run(client, only.info.run_id, res.run_dir)
    assert len(client.list_artifacts(only.info.run_id, "plots")) == len(PLOTS)
    plain = featcache.fit(head="mlp", store=world["store"], epochs=4, runs=str(tmp_path / "plain"), plots=False)
    assert plain.metrics == res.metrics
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in plain.history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in res.history]


def test_a_sweep_is_a_parent_run_with_one_child_per_combination(world, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    r = CliRunner().invoke(main, ["fit", "--store", world["store"], "--head", "logreg,mlp", "--lr", "1e-3,1e-2",
                                  "--epochs", "3", "--out", str(out), "--data", world["data"], "--quiet",
                                  "--tracker", "mlflow", "--tracking-uri", str(tmp_path / "elsewhere")])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "mlruns").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=str(tmp_path / "elsewhere"))
    experiment = client.get_experiment_by_name("featcache").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    sweep = json.loads((out / "sweep.json").read_text())
    assert sorted(children) == sorted(row["run"] for row in sweep["rows"]) == ["01-logreg", "02-mlp-lr=0.001",
                                                                               "03-mlp-lr=0.01"]
    for name, child in children.items():
        _check_mlflow_run(client, child.info.run_id, out / name)
    assert parent.info.run_name == "sw" and parent.data.params["lr"] == "[0.001, 0.01]"
    assert parent.data.params["head"] == '["logreg", "mlp"]' and "weight_decay" in parent.data.params
    assert "tracker" not in parent.data.params and "runs" not in parent.data.params
    assert parent.data.metrics["best_val_top1"] == sweep["rows"][0]["val_top1"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"sweep.csv", "sweep.json"}
    best_pngs = sorted(p.name for p in (out / sweep["best"]).glob("*.png"))  # plots: the best run only
    assert best_pngs and len(client.list_artifacts(children[sweep["best"]].info.run_id, "plots")) == len(best_pngs)


def _events(logdir: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return ea, {k: v.string_value or (v.bool_value if v.HasField("bool_value") else v.number_value)
                for k, v in hparams.items()}


def _check_events(logdir: Path, run: Path) -> None:
    from PIL import Image

    ea, params = _events(logdir)
    config, history, _ = _files(run)
    assert params == {k: v if isinstance(v, (int, float, str)) else param_value(v)
                      for k, v in _head_params(config).items()}
    for key in (k for k in (history[0] if history else {}) if k != "epoch"):
        events = ea.Scalars(grouped_tag(key))
        assert [e.step for e in events] == [row["epoch"] for row in history], key
        assert [e.value for e in events] == pytest.approx([row[key] for row in history], rel=1e-6)  # float32 there
    last = history[-1]["epoch"] if history else 0
    final = _final(run)
    assert {k: ea.Scalars(grouped_tag(k))[-1].value for k in final} == pytest.approx(final, rel=1e-6)
    assert all(ea.Scalars(grouped_tag(k))[-1].step == last for k in final)
    if history:  # one chart group per quantity, a curve per split
        assert {"loss/train", "acc/train", "loss/val", "acc/val", "time/epoch_seconds"} <= set(ea.Tags()["scalars"])
    pngs = sorted(run.glob("*.png"))
    assert sorted(ea.Tags()["images"]) == [f"plots/{p.stem}" for p in pngs]
    for png in pngs:
        (image,) = ea.Images(f"plots/{png.stem}")
        with Image.open(png) as img:
            assert (image.width, image.height) == img.size


def test_tensorboard_event_files_in_the_run_directory(world, tmp_path):
    r = CliRunner().invoke(main, ["fit", "--store", world["store"], "--head", "mlp", "--epochs", "3", "--data",
                                  world["data"], "--out", str(tmp_path / "run"), "--quiet", "--tracker", "tensorboard"])
    assert r.exit_code == 0, r.output
    assert f"note: tracked in TensorBoard event files in each run directory's tb/ (see: tensorboard --logdir " \
           f"{tmp_path / 'run'})" in r.output
    _check_events(tmp_path / "run" / "tb", tmp_path / "run")
    assert RunRecord.read(tmp_path / "run").metrics  # the run directory still reads back with tb/ in it


def test_tensorboard_sweep_under_a_tracking_folder(world, tmp_path):
    out = tmp_path / "sw"
    res = sweep(FitConfig(store=world["store"], out=str(out), epochs=2, plots=False,
                          tracker="tensorboard", tracking_uri=str(tmp_path / "tb")),
                {"head": ["svm", "linear"]})
    for row in res.rows:
        assert not (out / row["run"] / "tb").exists()
        _check_events(tmp_path / "tb" / "sw" / row["run"], out / row["run"])


@pytest.mark.parametrize("tracker,blocked", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_library_is_one_error_line_before_any_work(world, tmp_path, monkeypatch, tracker, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # import fails as if it were not installed
    r = CliRunner().invoke(main, ["fit", "--store", world["store"], "--head", "mlp,linear", "--runs",
                                  str(tmp_path / "runs"), "--tracker", tracker])
    assert r.exit_code == 1
    assert r.output == f"Error: --tracker {tracker} needs {'MLflow' if tracker == 'mlflow' else 'TensorBoard'}: " \
                       f"pip install 'featcache[{tracker}]'\n"
    assert not (tmp_path / "runs").exists()


def test_a_failing_tracker_is_a_note_and_the_run_is_kept(world, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")

    def broken(self, run, row):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(MLflowTracker, "epoch", broken)
    res = featcache.fit(head="mlp", store=world["store"], epochs=3, runs=str(tmp_path / "runs"), plots=False,
                        tracker="mlflow", tracking_uri=str(tmp_path / "mlruns"))
    assert res.notes[-1:] == ["mlflow tracking stopped while logging epoch 1 (ConnectionError: tracking server went "
                         "away); the run directories are complete and their results unchanged"]
    assert RunRecord.read(res.run_dir).metrics == res.metrics
    plain = featcache.fit(head="mlp", store=world["store"], epochs=3, runs=str(tmp_path / "plain"), plots=False)
    assert plain.metrics == res.metrics
    assert np.isfinite(res.metrics["val"]["log_loss"])


def test_a_logreg_run_logs_only_what_logreg_takes_and_a_model_that_loads_without_pickle(world, tmp_path,
                                                                                        monkeypatch):
    """A logreg run used to log all 32 FitConfig fields (hidden=256, lr=0.001, epochs=30) and no model."""
    res = featcache.fit(head="logreg", store=world["store"], runs=str(tmp_path / "runs"), plots=False,
                        tracker="mlflow", tracking_uri=str(tmp_path / "mlruns"))
    client, experiment = _mlflow(tmp_path, monkeypatch)
    (only,) = client.search_runs([experiment])
    assert only.data.params == {"head": "logreg", "C": "auto", "max_iter": "2000", "seed": "0"}
    assert only.data.tags["featcache.fit_pool"] == "none"
    folder = client.download_artifacts(only.info.run_id, "model", str(tmp_path / "down"))
    assert sorted(p.name for p in Path(folder).iterdir()) == ["head.json", "head.npz"]
    with np.load(Path(folder) / "head.npz", allow_pickle=False) as z:  # arrays only
        assert all(z[k].dtype != object for k in z.files)
    fs = featcache.open_store(world["store"]).get_set()
    x = fs.features("val").astype(np.float32)
    np.testing.assert_array_equal(load_head(Path(folder)).predict_proba(x), res.head.predict_proba(x))


def test_tensorboard_curves_are_on_disk_while_the_head_trains(world, tmp_path):
    """Event files used to be written only when the run ended: no live curves."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = {}

    def look(row):
        ea = EventAccumulator(str(tmp_path / "run" / "tb"))
        ea.Reload()
        seen[row["epoch"]] = [e.step for e in ea.Scalars("loss/train")] if "loss/train" in ea.Tags()["scalars"] else []

    featcache.fit(head="linear", store=world["store"], epochs=3, plots=False, out=str(tmp_path / "run"),
                  tracker="tensorboard", on_epoch=look)
    assert seen == {1: [1], 2: [1, 2], 3: [1, 2, 3]}


def test_a_failed_tracked_fit_leaves_no_run_directory(world, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")

    def boom(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        featcache.fit(head="linear", store=world["store"], epochs=3, plots=False, runs=str(tmp_path / "runs"),
                      tracker="tensorboard", on_epoch=boom)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
    (tmp_path / "mine").mkdir()  # an empty --out the user made stays, empty
    with pytest.raises(KeyboardInterrupt):
        featcache.fit(head="linear", store=world["store"], epochs=3, plots=False, out=str(tmp_path / "mine"),
                      tracker="tensorboard", on_epoch=boom)
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
