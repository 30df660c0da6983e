"""timm:NAME backbones: stored rows equal timm's own embedding on timm's own preprocessing."""

import numpy as np
import pytest
import torch
from PIL import Image

import featcache
from featcache.backbones import create_backbone, list_layers
from featcache.errors import UnknownBackbone, UnknownLayer, WeightsError

from .helpers import make_folder

pytest.importorskip("timm")
import timm.data


def _reference(name: str, paths: list) -> np.ndarray:
    """timm's documented embedding, computed without featcache: seeded random init, timm's eval transform."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("convnext_atto", 320), ("vit_tiny_patch16_224", 192)])
def test_stored_rows_are_timms_embedding(tmp_path, name, dim):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))
    store = str(tmp_path / "store.zarr")
    r = featcache.extract(backbone=f"timm:{name}", weights="none", data=str(data), store=store, workers=0)
    assert r.shape == (dim,) and r.extracted == 9
    fs = featcache.open_store(store).get_set()
    x, _ = fs.to_numpy("train")
    want = _reference(name, [data / p for p in fs.paths("train")])
    np.testing.assert_allclose(x.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    a = fs.attrs
    assert a["backbone"] == f"timm:{name}" and a["layer"] == "pre_logits"
    config = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))
    assert a["preprocessing"]["data_config"]["crop_pct"] == config["crop_pct"]
    assert a["preprocessing"]["data_config"]["interpolation"] == config["interpolation"]


def test_preprocessing_is_the_models_own_and_part_of_the_space():
    vit = create_backbone("timm:vit_tiny_patch16_224", weights="none")
    assert vit.preprocessing["mean"] == [0.5, 0.5, 0.5] and vit.preprocessing["data_config"]["crop_pct"] == 0.9
    assert "bicubic" in vit.preprocessing["repr"]
    assert vit.provenance()["preprocessing"] == vit.preprocessing  # so it keys the feature space
    resnet = create_backbone("timm:resnet18", weights="none")
    assert resnet.preprocessing["data_config"]["crop_pct"] == 0.95 and resnet.preprocessing["mean"][0] == 0.485


def test_layers_and_errors():
    assert create_backbone("timm:resnet18", layer="layer3", weights="none").shape == (256, 14, 14)
    assert create_backbone("timm:resnet18", layer="layer3", pool="avg", weights="none").shape == (256,)
    layers = list_layers("timm:resnet18")
    assert layers[0] == "pre_logits" and layers.index("layer3") < layers.index("layer4")
    with pytest.raises(UnknownLayer, match=r"Unknown layer 'nope' for timm:resnet18\. Layers: pre_logits, conv1"):
        create_backbone("timm:resnet18", layer="nope", weights="none")
    with pytest.raises(UnknownBackbone, match="Unknown timm model 'resnet19'; closest: timm:resnet18"):
        create_backbone("timm:resnet19", weights="none")
    with pytest.raises(WeightsError, match=r"takes DEFAULT, none, or a local \.safetensors"):
        create_backbone("timm:resnet18", weights="IMAGENET1K_V1")


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    b = create_backbone("timm:resnet18", weights=str(tmp_path / "model.safetensors"))
    assert b.weights_id == "file:model.safetensors"
    assert b.weights_sha256 != create_backbone("timm:resnet18", weights="none").weights_sha256
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), model.eval().forward_head(model.forward_features(x), pre_logits=True))


def test_without_timm_the_error_names_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UnknownBackbone, match=r"pip install 'featcache\[timm\]'"):
        create_backbone("timm:resnet18", weights="none")


def test_timm_efficientnet_lite0_is_another_feature_space_than_the_offline_one():
    """Same architecture and parameter shapes, but timm's preprocessing (ImageNet mean/std, bicubic,
    crop 0.875), symmetric padding and batch-norm eps: never mixed with efficientnet_lite0's rows."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from featcache.backbones import _build

    ours, theirs = create_backbone("efficientnet_lite0", weights="none"), create_backbone("timm:efficientnet_lite0",
                                                                                          weights="none")
    assert ours.shape == theirs.shape == (1280,)
    assert ours.preprocessing["mean"] == [0.5] * 3 and theirs.preprocessing["mean"] == [0.485, 0.456, 0.406]
    assert ours.provenance() != theirs.provenance()
    shapes = [tuple(v.shape) for v in _build("efficientnet_lite0", "none")[0].state_dict().values()]
    assert shapes == [tuple(v.shape) for v in timm.create_model("efficientnet_lite0").state_dict().values()]


def test_layers_of_a_timm_model_list_its_stages_first_and_no_parameters():
    """What a timm user looks for: the embedding, then feature_info's stages; no parameter nodes without a shape."""
    from featcache.backbones import layer_shapes

    shapes, default = layer_shapes("timm:convnext_atto")
    names = [n for n, _ in shapes]
    stages = [info["module"] for info in timm.create_model("convnext_atto", pretrained=False).feature_info]
    assert default == "pre_logits" and names[0] == "pre_logits"
    assert names[1 : 1 + len(stages)] == stages == ["stages.0", "stages.1", "stages.2", "stages.3"]
    assert dict(shapes)["stages.3"] == (320, 7, 7)
    assert all(shape for _, shape in shapes), [n for n, s in shapes if not s]
    assert not [n for n in names if n.endswith(("_weight", "_gamma", "_bias"))]
