"""The seams where a run meets a backbone rebuilt for it: predict, evaluate and export refuse a backbone
whose feature space is not the run's, and a Hugging Face model's config, processor backend and
transformers version are part of the space, so an edited folder never reuses stale rows."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms._presets import ImageClassification

import featcache
from featcache.backbones import create_backbone
from featcache.cli import main
from featcache.data import load_rgb
from featcache.errors import BackboneMismatch
from featcache.evaluate import evaluate
from featcache.predict import export, predict

from . import tiny_backbone
from .helpers import TINY, make_folder


def _files(folder: Path, split: str = "val") -> list[Path]:
    return sorted((folder / split).rglob("*.png"))


@pytest.fixture
def tiny_run(folder, store_url, tmp_path) -> str:
    featcache.extract(backbone=TINY, data=str(folder), store=store_url, weights="none", workers=0)
    return str(featcache.fit(head="logreg", store=store_url, runs=str(tmp_path / "runs")).run_dir)


def test_a_factory_whose_transforms_changed_is_refused_by_predict_evaluate_and_export(
        tiny_run, folder, store_url, tmp_path, monkeypatch):
    files = _files(folder)
    before = predict(tiny_run, files, backbone=TINY, workers=0)  # the same factory: accepted
    assert all(r.error is None for r in before)
    old = create_backbone(TINY, weights="none")
    # same weights, same shape; only the preprocessing the factory brings has changed
    monkeypatch.setattr(tiny_backbone.TinyCNN, "transforms",
                        ImageClassification(crop_size=32, resize_size=32, mean=(0.9, 0.1, 0.5), std=(0.1, 0.1, 0.1)))
    new = create_backbone(TINY, weights="none")
    assert new.weights_sha256 == old.weights_sha256 and new.shape == old.shape
    with torch.no_grad():  # the attack is real: the rows a fresh computation gives are other rows
        x = [t(load_rgb(files[0]))[None] for t in (old.transform, new.transform)]
        assert not torch.allclose(old.model(x[0]), new.model(x[1]), atol=1e-3)
    space = featcache.open_store(store_url).get_set().attrs["space"]
    rows_before = len(featcache.open_store(store_url).known_hashes(space))
    want = "computes other features than .* preprocessing.mean is \\[0.9, 0.1, 0.5\\] here but \\[0.485"
    with pytest.raises(BackboneMismatch, match=want):
        predict(tiny_run, files, backbone=TINY, workers=0)
    new_images = make_folder(tmp_path / "new", splits=(("", 2),), seed=5)
    for store in (True, False):
        with pytest.raises(BackboneMismatch, match=want):
            evaluate(tiny_run, new_images, store=store, backbone=TINY, workers=0)
    assert len(featcache.open_store(store_url).known_hashes(space)) == rows_before  # nothing added
    with pytest.raises(BackboneMismatch, match=want):
        export(tiny_run, tmp_path / "model.pt2", backbone=TINY)
    assert not (tmp_path / "model.pt2").exists() and not (tmp_path / "model.pt2.json").exists()
    runner = CliRunner()
    for args in (["predict", tiny_run, str(files[0])], ["evaluate", tiny_run, "--data", str(new_images), "--no-store"],
                 ["export", tiny_run, str(tmp_path / "m.pt2")]):
        r = runner.invoke(main, args + ["--backbone", TINY])
        errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
        assert r.exit_code == 1 and len(errors) == 1 and "Traceback" not in r.output, r.output
        assert "preprocessing.mean" in errors[0]
        assert "extract the images again with this one and fit a new run" in errors[0]


def test_an_unchanged_factory_is_still_accepted_and_adds_its_rows(tiny_run, folder, tmp_path):
    out = export(tiny_run, tmp_path / "tiny.pt2", backbone=TINY)
    assert json.loads(Path(str(out) + ".json").read_text())["preprocessing"]["crop_size"] == [32]
    new = make_folder(tmp_path / "new", splits=(("", 1),), seed=3)
    res = evaluate(tiny_run, new, backbone=TINY, workers=0)
    assert (res.counts.computed, res.counts.stored) == (3, 3) and not res.notes


@pytest.mark.parametrize("name, weights", [("efficientnet_lite0", "DEFAULT"), ("resnet18", "none"), ("timm:resnet18", "none"),
                                           (TINY, "none")])
def test_a_backbone_rebuilt_by_name_has_the_space_it_was_extracted_with(name, weights):
    from types import SimpleNamespace

    from featcache.backbones import rebuild_backbone
    from featcache.data import DECODE_RECIPE
    from featcache.lookup import space_differences

    at_extract = create_backbone(name, weights=weights)
    prov = json.loads(json.dumps({**at_extract.provenance(), "decode": DECODE_RECIPE, "precision": "float32",
                                  "dtype": "float16"}))
    rebuilt = rebuild_backbone({"weights": weights, "layer": at_extract.layer, "pool": at_extract.pool}, name,
                               given=name if ":" in name else None)
    assert space_differences(SimpleNamespace(space_provenance=prov), rebuilt) == ([], [])


# ---- Hugging Face: the config, the processor backend and the transformers version are in the space ----

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_seams") / "vit"
    torch.manual_seed(4321)
    model = transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(root)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def _copy(vit_folder: Path, to: Path) -> Path:
    shutil.copytree(vit_folder, to)
    return to


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _reference(folder: Path, paths: list[Path]) -> np.ndarray:
    """The folder's model on its own processor's inputs, computed without featcache."""
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    x = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=x).pooler_output.numpy()


@pytest.mark.parametrize("changes", [{"hidden_act": "relu"}, {"layer_norm_eps": 0.5}])
def test_an_edited_config_with_the_same_weights_is_a_new_space_with_fresh_rows(vit_folder, tmp_path, changes):
    model = _copy(vit_folder, tmp_path / "vit")
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))
    store = str(tmp_path / "store.zarr")
    first = featcache.extract(backbone=f"hf:{model}", data=str(data), store=store, workers=0)
    _edit_config(model, **changes)
    second = featcache.extract(backbone=f"hf:{model}", data=str(data), store=store, workers=0)
    assert second.space != first.space and second.extracted == 9 and second.reused == 0
    fs = featcache.open_store(store).get_set(second.set_key)
    key = next(iter(changes))
    assert fs.attrs["space_provenance"]["network"]["config"][key] == changes[key]
    assert {"torch", "torchvision", "timm", "transformers", "pillow"} <= set(fs.attrs["versions"])  # recorded
    x, _ = fs.to_numpy("train")
    want = _reference(model, [data / p for p in fs.paths("train")])
    stale = featcache.open_store(store).get_set(first.set_key).to_numpy("train")[0].astype(np.float32)
    assert np.abs(stale - want).max() > 10 * 2e-3 * np.abs(want).max()  # the old rows would have been wrong
    np.testing.assert_allclose(x.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def _force_backend(monkeypatch, backend: str) -> None:
    """An environment whose image processors default to ``backend`` (PIL where torchvision is not installed)."""
    real = transformers.AutoImageProcessor.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        return real(cls, *args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", classmethod(from_pretrained))


@pytest.fixture
def vit_run(vit_folder, tmp_path) -> tuple[str, Path, Path]:
    model = _copy(vit_folder, tmp_path / "vit")
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))
    store = str(tmp_path / "store.zarr")
    featcache.extract(backbone=f"hf:{model}", data=str(data), store=store, workers=0)
    return featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs")).run_dir, model, data


def test_the_processor_backend_is_recorded_and_keys_the_space(vit_run, tmp_path, monkeypatch):
    run, model, data = vit_run
    store = str(tmp_path / "store.zarr")
    first = featcache.open_store(store).get_set()
    assert first.attrs["preprocessing"]["backend"] == "torchvision"
    _force_backend(monkeypatch, "pil")
    other = featcache.extract(backbone=f"hf:{model}", data=str(data), store=store, workers=0)
    assert other.space != first.attrs["space"] and other.reused == 0
    assert featcache.open_store(store).get_set(other.set_key).attrs["preprocessing"]["backend"] == "pil"
    with pytest.raises(BackboneMismatch, match=r'preprocessing\.backend is "pil" here but "torchvision" in the run'):
        predict(run, _files(data), backbone=f"hf:{model}", workers=0)


def test_predict_and_evaluate_refuse_an_edited_config_or_another_transformers(vit_run, tmp_path, monkeypatch):
    run, model, data = vit_run
    name = f"hf:{model}"
    monkeypatch.chdir(model.parent)  # the same folder named by another path is the same network
    assert all(r.error is None for r in predict(run, _files(data), backbone="hf:vit", workers=0))
    assert not evaluate(run, data / "val", backbone="hf:vit", workers=0).notes
    from featcache.backbones import hf

    monkeypatch.setattr(hf._transformers(), "__version__", "0.0.1")  # the module featcache runs (as imported now)
    with pytest.raises(BackboneMismatch, match=r"network.version is \"0.0.1\" here but \"[0-9.]+\" in the run.*"
                                               r"pip install transformers==[0-9.]+"):
        predict(run, _files(data), backbone=name, workers=0)
    monkeypatch.undo()
    _edit_config(model, hidden_act="relu")
    for call in (lambda: predict(run, _files(data), backbone=name, workers=0),
                 lambda: evaluate(run, data / "val", backbone=name, workers=0),
                 lambda: export(run, tmp_path / "vit.pt2", backbone=name)):
        with pytest.raises(BackboneMismatch, match=r'network\.config\.hidden_act is "relu" here but "gelu" in the run'):
            call()


def test_a_set_from_before_the_network_was_recorded_stays_readable(vit_folder, tmp_path, monkeypatch):
    from featcache.backbones import hf

    model = _copy(vit_folder, tmp_path / "vit")
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))
    store = str(tmp_path / "store.zarr")
    plain = hf._preprocessing
    with monkeypatch.context() as m:  # what featcache recorded before: no network, no processor backend
        m.setattr(hf, "_network", lambda model: None)
        m.setattr(hf, "_preprocessing", lambda processor, size: {
            k: v for k, v in plain(processor, size).items() if k not in ("backend", "processor_class")})
        old = featcache.extract(backbone=f"hf:{model}", data=str(data), store=store, workers=0)
        run = featcache.fit(head="logreg", store=store, runs=str(tmp_path / "runs")).run_dir
    assert "network" not in featcache.open_store(store).get_set(old.set_key).attrs["space_provenance"]
    got = predict(run, _files(data), backbone=f"hf:{model}", workers=0)
    assert all(r.error is None for r in got) and got.counts.from_store == 3
    assert any("does not record network, preprocessing.backend, preprocessing.processor_class" in n for n in got.notes)
    x, _ = featcache.open_store(store).get_set(old.set_key).to_numpy("train")
    assert x.shape == (6, 32)
    new = featcache.extract(backbone=f"hf:{model}", data=str(data), store=store, workers=0)
    assert new.space != old.space and new.extracted == 9  # a new space: extracted again once
