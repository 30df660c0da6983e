"""hf:NAME_OR_DIR backbones: stored rows equal the model's own outputs on its own image processor's inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

import featcache
from featcache.backbones import create_backbone, list_layers, rebuild_backbone
from featcache.errors import UnknownBackbone, UnknownLayer

from .helpers import make_folder

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """A tiny ViT and ConvNeXt built from a config and saved as a hub folder would hold them."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1234)  # other weights than featcache's seeded random init
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    vit.save_pretrained(root / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    convnext.save_pretrained(root / "convnext")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(root / "convnext")
    return {"vit": str(root / "vit"), "convnext": str(root / "convnext")}


def _reference(folder: str, paths: list, hidden: int | None = None) -> np.ndarray:
    """The model's documented outputs, computed without featcache."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    x = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    return (out.pooler_output if hidden is None else out.hidden_states[hidden]).numpy()


@pytest.mark.parametrize("kind, dim", [("vit", 32), ("convnext", 16)])
def test_stored_rows_are_the_pooled_output(tmp_path, tiny_models, kind, dim):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))
    store = str(tmp_path / "store.zarr")
    r = featcache.extract(backbone=f"hf:{tiny_models[kind]}", data=str(data), store=store, workers=0)
    assert r.shape == (dim,) and r.extracted == 9
    fs = featcache.open_store(store).get_set()
    x, _ = fs.to_numpy("train")
    want = _reference(tiny_models[kind], [data / p for p in fs.paths("train")])
    np.testing.assert_allclose(x.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    a = fs.attrs
    assert a["layer"] == "pooler_output" and a["preprocessing"]["processor"]["image_mean"] == [0.5, 0.5, 0.5]


def test_hidden_states_by_index(tmp_path, tiny_models):
    data = make_folder(tmp_path / "data", splits=(("train", 1), ("val", 1)), size=(20, 28))
    store = str(tmp_path / "store.zarr")
    r = featcache.extract(backbone=f"hf:{tiny_models['vit']}", layer="hidden_states.1", data=str(data), store=store,
                          workers=0)
    assert r.shape == (17, 32)
    fs = featcache.open_store(store).get_set()
    x, _ = fs.to_numpy("train")
    want = _reference(tiny_models["vit"], [data / p for p in fs.paths("train")], hidden=1)
    np.testing.assert_allclose(x.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert create_backbone(f"hf:{tiny_models['convnext']}", layer="hidden_states.1", pool="avg").shape == (8,)
    assert create_backbone(f"hf:{tiny_models['convnext']}", layer="hidden_states.1").shape == (8, 8, 8)


def test_layers_errors_and_random_init(tiny_models):
    name = f"hf:{tiny_models['vit']}"
    assert list_layers(name) == ["pooler_output", "last_hidden_state", "cls", "mean", "hidden_states.0",
                                 "hidden_states.1", "hidden_states.2"]
    with pytest.raises(UnknownLayer, match=r"Unknown layer 'blocks.1' for hf:.*Layers: pooler_output, "):
        create_backbone(name, layer="blocks.1")
    none = create_backbone(name, weights="none")
    assert none.weights_id == "none(seed=0)" and none.weights_sha256 == create_backbone(name, weights="none").weights_sha256
    assert none.weights_sha256 != create_backbone(name).weights_sha256
    with pytest.raises(UnknownBackbone, match="hf:/nonexistent/dir is neither a folder here nor a Hugging Face hub id"):
        create_backbone("hf:/nonexistent/dir")


def test_pickled_weights_are_refused(tmp_path, tiny_models):
    import shutil
    from pathlib import Path

    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path(tiny_models["vit"]) / name, folder / name)
    torch.save(transformers.AutoModel.from_pretrained(tiny_models["vit"]).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnknownBackbone, match=r"no pickled \.bin weights"):
        create_backbone(f"hf:{folder}")


def test_a_stored_local_folder_is_loaded_only_when_the_user_names_it(tiny_models):
    name = f"hf:{tiny_models['vit']}"
    with pytest.raises(UnknownBackbone, match=r"local model folder .*Pass --backbone hf:"):
        rebuild_backbone({"weights": "DEFAULT"}, name)
    assert rebuild_backbone({"weights": "DEFAULT"}, name, given=name).layer == "pooler_output"


def test_a_classifiers_checkpoint_without_pooler_weights_gives_the_first_token_not_random_rows(tmp_path):
    """ViTForImageClassification saves no pooler: the base model is loaded without one (not with a pooler
    started at random), and the default layer is the first token of the last hidden state."""
    torch.manual_seed(3)
    clf = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=3))
    clf.save_pretrained(tmp_path / "vitc")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vitc")
    data = make_folder(tmp_path / "data", splits=(("train", 2),))
    r = featcache.extract(backbone=f"hf:{tmp_path / 'vitc'}", data=str(data), store=str(tmp_path / "s.zarr"), workers=0,
                          dtype="float32")
    fs = featcache.open_store(str(tmp_path / "s.zarr")).get_set(r.set_key)
    assert fs.record.layer == "cls"
    model = transformers.ViTModel.from_pretrained(tmp_path / "vitc", add_pooling_layer=False).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "vitc")
    paths = [data / p for p in fs.paths("train")]
    x = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(fs.to_numpy("train")[0], want, rtol=1e-4, atol=1e-5)
