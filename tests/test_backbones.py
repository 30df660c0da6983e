import urllib.error

import pytest
import torch

from featcache.backbones import create_backbone, default_layer, list_backbones, list_layers
from featcache.errors import UnknownBackbone, UnknownLayer, WeightsError

from .helpers import TINY


def test_registry_lists_torchvision_and_offline_models():
    names = list_backbones()
    for name in ("resnet18", "vgg16", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0"):
        assert name in names


def test_vgg16_features_keep_the_spatial_map():
    b = create_backbone("vgg16", layer="features", weights="none")
    assert b.shape == (512, 7, 7) and b.pool == "none"
    assert b.preprocessing["crop_size"] == [224]
    assert b.weights_id == "none(seed=0)"


def test_resnet_default_layer_and_pooling():
    b = create_backbone("resnet18", weights="none")
    assert (b.layer, b.shape) == ("flatten", (512,))
    assert create_backbone("resnet18", layer="layer3", weights="none", pool="avg").shape == (256,)
    assert create_backbone("resnet18", layer="layer3", weights="none").shape == (256, 14, 14)
    x = torch.rand(2, 3, 64, 64)
    mx = create_backbone("resnet18", layer="layer4", weights="none", pool="max").model(x)
    full = create_backbone("resnet18", layer="layer4", weights="none").model(x)
    torch.testing.assert_close(mx, full.amax(dim=(2, 3)))


def test_seeded_random_init_is_reproducible():
    a = create_backbone("resnet18", weights="none")
    b = create_backbone("resnet18", weights="none")
    assert a.weights_sha256 == b.weights_sha256


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownLayer) as e:
        create_backbone("vgg16", layer="feature", weights="none")
    assert str(e.value) == (
        "Unknown layer 'feature' for vgg16. Layers: features, avgpool, flatten, classifier "
        "(and their sub-layers, e.g. features.20). See: featcache layers vgg16"
    )
    with pytest.raises(UnknownBackbone, match=r"closest: resnet18, .*All names: featcache backbones"):
        create_backbone("resnet19")
    with pytest.raises(WeightsError, match="Choose one of: DEFAULT, IMAGENET1K_V1, none"):
        create_backbone("resnet18", weights="IMAGENET_V9")


def test_layers_listing():
    layers = list_layers("resnet18")
    assert layers.index("layer3") < layers.index("layer4") < layers.index("avgpool")
    assert "layer4.1.relu_1" in layers
    assert default_layer("vgg16") == "classifier.5"


def test_failed_download_explains_how_to_pass_a_local_file(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(WeightsError) as e:
        create_backbone("resnet18", weights="DEFAULT")
    assert "could not download ResNet18_Weights.IMAGENET1K_V1" in str(e.value)
    assert "--weights /path/to/resnet18-f37072fd.pth" in str(e.value)


def test_local_weights_file_loads_safely(tmp_path):
    from tests.tiny_backbone import TinyCNN

    model = TinyCNN()
    torch.nn.init.constant_(model.features[0].weight, 0.5)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    b = create_backbone(TINY, weights=str(tmp_path / "w.pth"))
    assert b.weights_id == "file:w.pth"
    assert b.weights_sha256 != create_backbone(TINY, weights="none").weights_sha256

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        create_backbone(TINY, weights=str(tmp_path / "evil.pth"))
    torch.save({"nope": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="do not fit this architecture"):
        create_backbone(TINY, weights=str(tmp_path / "other.pth"))


def test_offline_pretrained_efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    b = create_backbone("efficientnet_lite0")
    assert (b.layer, b.shape) == ("dropout", (1280,))
    assert b.preprocessing["mean"] == [0.5, 0.5, 0.5] and b.preprocessing["std"] == [0.5, 0.5, 0.5]
    assert b.weights_sha256 != create_backbone("efficientnet_lite0", weights="none").weights_sha256
    assert "blocks.15" in list_layers("efficientnet_lite0")


def test_factory_backbone_errors():
    with pytest.raises(UnknownBackbone, match=r"cannot import backbone factory 'nope\.mod:f'"):
        create_backbone("nope.mod:f")
    with pytest.raises(UnknownBackbone, match=r"expected a torch\.nn\.Module"):
        create_backbone("builtins:dict")


def test_a_module_in_python_with_its_transform(folder, tmp_path):
    import numpy as np
    from torchvision.transforms._presets import ImageClassification

    import featcache
    from featcache.data import load_rgb
    from tests.tiny_backbone import TinyCNN

    torch.manual_seed(3)
    model = TinyCNN()
    preprocess = ImageClassification(crop_size=32, resize_size=32)
    store = str(tmp_path / "s.zarr")
    r = featcache.extract(backbone=model, transform=preprocess, layer="avgpool", data=str(folder), store=store,
                          workers=0)
    fs = featcache.open_store(store).get_set()
    assert fs.attrs["backbone"] == "python:tests.tiny_backbone.TinyCNN" and r.shape == (16, 2, 2)
    x, _ = fs.to_numpy("train")
    with torch.no_grad():
        want = model.avgpool(model.features(preprocess(load_rgb(folder / fs.paths("train")[0]))[None]))[0]
    np.testing.assert_allclose(x[0].astype(np.float32), want.numpy(), rtol=1e-2, atol=1e-3)
    again = featcache.extract(backbone=model, transform=preprocess, layer="avgpool", data=str(folder), store=store,
                              workers=0)
    assert again.extracted == 0 and again.space == r.space
    with torch.no_grad():
        model.features[0].weight.mul_(2)
    other = featcache.extract(backbone=model, transform=preprocess, layer="avgpool", data=str(folder),
                              store=store, workers=0)
    assert other.space != r.space and other.extracted == r.extracted  # other weights, another space


def test_a_module_without_preprocessing_is_refused():
    import torchvision

    with pytest.raises(UnknownBackbone, match=r"featcache.extract\(backbone=<ResNet>\) needs the model's "
                                              r"preprocessing: pass transform=\.\.\."):
        create_backbone(torchvision.models.resnet18())
    with pytest.raises(UnknownBackbone, match="without a transforms attribute, so its preprocessing is unknown"):
        create_backbone("tests.tiny_backbone:bare_cnn")


def test_layers_command_prints_shapes_marks_the_default_and_filters():
    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["layers", TINY])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["features", "16x16x16"]
    assert ["avgpool", "16x2x2"] in [ln.split() for ln in lines]
    assert [ln.split() for ln in lines if "(default)" in ln] == [["classifier.2", "32", "(default)"]]
    assert lines[-1] == "12 layers; default: classifier.2"
    r = CliRunner().invoke(main, ["layers", TINY, "--match", "classifier.*"])
    assert [ln.split()[0] for ln in r.output.splitlines()[:-1]] == [f"classifier.{i}" for i in range(4)]
    assert r.output.splitlines()[-1] == "4 layers matching classifier.*; default: classifier.2"
    r = CliRunner().invoke(main, ["layers", "timm:resnet18", "--match", "layer[34]"])
    assert r.output.splitlines()[:2] == ["layer3  256x14x14", "layer4  512x7x7"]
