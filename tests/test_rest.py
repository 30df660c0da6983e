"""--head rest: the pretrained remainder of the network, trained from an intermediate cache."""

import json

import numpy as np
import pytest
import torch

import featcache
from featcache.errors import FeatcacheError
from featcache.heads import LogRegHead, RestHead
from featcache.predict import predict
from featcache.tails import RestNetwork, load_head

from .helpers import make_folder


def _reference(name):
    from featcache.backbones import _build

    return dict(_build(name, "none")[0].state_dict())


def test_resnet_layer3_cache_trains_layer4_and_a_new_fc(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", layer="layer3", weights="none", data=str(folder), store=store, workers=0)
    res = featcache.fit(head="rest", store=store, epochs=2, freeze=("layer4.0",), runs=str(tmp_path / "runs"),
                        plots=False, patience=0, init="random")
    head = load_head(res.run_dir)
    state = head.module_.state_dict()
    before = _reference("resnet18")
    assert state["fc.weight"].shape == (3, 512)  # replaced for the 3 classes
    assert not any(k.startswith(("layer1", "layer2", "layer3", "conv1")) for k in state)  # only what comes after the cut
    assert torch.equal(state["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])  # frozen
    assert not torch.equal(state["layer4.1.conv1.weight"], before["layer4.1.conv1.weight"])  # trained, pretrained start
    assert torch.equal(state["layer4.1.bn1.running_mean"], before["layer4.1.bn1.running_mean"])  # BN statistics kept
    # predict rebuilds the same network from the run directory
    fs = featcache.open_store(store).get_set()
    want = head.predict_proba(fs.features("val").astype(np.float32))
    got = predict(res.run_dir, [folder / p for p in fs.paths("val")], top_k=3)
    for g, w in zip(got, want):
        assert abs(dict(g.top)[fs.classes[int(w.argmax())]] - w.max()) < 1e-3


def test_warmup_epochs_train_only_the_new_layer(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", layer="layer3", weights="none", data=str(folder), store=store, workers=0)
    fs = featcache.open_store(store).get_set()
    x, y = fs.features("train").astype(np.float32), fs.labels("train")
    before = _reference("resnet18")
    rest_of = {"backbone": "resnet18", "layer": "layer3", "weights": "none"}

    def trained(epochs: int, warmup: int) -> dict:
        head = RestHead(rest_of=rest_of, network=RestNetwork(), epochs=epochs, warmup_epochs=warmup, patience=0, init="random")
        return head.fit(x, y, classes=range(3)).module_.state_dict()  # no val: the lowest train loss is kept

    probe = trained(epochs=2, warmup=2)
    assert torch.equal(probe["layer4.1.conv1.weight"], before["layer4.1.conv1.weight"])  # still pretrained
    assert not torch.equal(probe["fc.weight"], trained(epochs=1, warmup=1)["fc.weight"])  # the new layer learns
    tuned = trained(epochs=4, warmup=1)
    assert not torch.equal(tuned["layer4.1.conv1.weight"], before["layer4.1.conv1.weight"])  # joined after the warm-up
    assert torch.equal(tuned["layer4.1.bn1.running_mean"], before["layer4.1.bn1.running_mean"])


def test_probe_init_is_a_logistic_regression_on_what_the_new_layer_reads(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", layer="layer3", weights="none", data=str(folder), store=store, workers=0)
    fs = featcache.open_store(store).get_set()
    x, y = fs.features("train").astype(np.float32), fs.labels("train")
    head = RestHead(rest_of={"backbone": "resnet18", "layer": "layer3", "weights": "none"}, network=RestNetwork())
    model = head._build_module(x.shape[1:], 3)
    head._start(model, x, y, torch.device("cpu"), 3)
    info = head.probe_
    seen = []
    model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        got = torch.softmax(model.eval()(torch.from_numpy(x)), 1).numpy()
    want = LogRegHead(C=1.0).fit(seen[0].numpy(), y, classes=range(3)).predict_proba(seen[0].numpy())
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert info["C"] == 1.0 and 0 <= info["train_acc"] <= 1
    res = featcache.fit(head="rest", store=store, epochs=2, runs=str(tmp_path / "runs"), plots=False)  # the default
    saved = json.loads((res.run_dir / "head.json").read_text())
    assert saved["params"]["init"] == "probe" and "val_acc" in saved["fitted"]["probe"]


def test_rest_needs_unpooled_features(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", layer="layer3", pool="avg", weights="none", data=str(folder), store=store,
                      workers=0)
    with pytest.raises(FeatcacheError, match="needs unpooled features"):
        featcache.fit(head="rest", store=store, runs=str(tmp_path / "runs"))


@pytest.mark.slow
def test_vgg16_features_cache_trains_the_classifier_block(tmp_path):
    folder = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)))  # 9 images: vgg16 is 15 GFLOPs each
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="vgg16", layer="features", weights="none", data=str(folder), store=store, workers=0)
    res = featcache.fit(head="rest", store=store, epochs=1, runs=str(tmp_path / "runs"), plots=False)
    state = load_head(res.run_dir).module_.state_dict()
    assert state["classifier.6.weight"].shape == (3, 4096) and "classifier.0.weight" in state


@pytest.mark.slow
def test_efficientnet_lite0_rest_reaches_pooled_logreg_on_hymenoptera(hymenoptera, lite0_hymenoptera, tmp_path):
    """The pretrained head block trained from a blocks.15 cache (320x7x7), its new layer started
    as a linear probe, reaches pooled logreg's accuracy (C = 1) on the same val images."""
    pooled_store, pooled = lite0_hymenoptera  # the pooled set, shared with test_hymenoptera (read only)
    store = str(tmp_path / "s.zarr")
    runs = str(tmp_path / "runs")
    maps = featcache.extract(backbone="efficientnet_lite0", layer="blocks.15", pool="none", data=str(hymenoptera), store=store)
    logreg = featcache.fit(head="logreg", C=1.0, set=pooled.set_key, store=pooled_store, runs=runs, plots=False)
    rest = featcache.fit(head="rest", set=maps.set_key, store=store, epochs=15, runs=runs, plots=False)
    assert rest.metrics["val"]["top1"] >= logreg.metrics["val"]["top1"] >= 0.92, (rest.metrics["val"], logreg.metrics["val"])


def test_freeze_names_must_exist(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", layer="layer3", weights="none", data=str(folder), store=store, workers=0)
    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["fit", "--head", "rest", "--store", store, "--freeze", "layer9", "--epochs", "1",
                                  "--runs", str(tmp_path / "runs")])
    assert r.exit_code == 2
    assert "Error: Invalid value for '--freeze': --freeze 'layer9' matches no layer after the cut. Layers: fc, layer4.0" in r.output


def _fit_rest(store: str, tmp_path, *extra: str):
    from click.testing import CliRunner

    from featcache.cli import main

    return CliRunner().invoke(main, ["fit", "--head", "rest", "--store", store, "--epochs", "1", "--init", "random",
                                     "--runs", str(tmp_path / "runs"), "--no-plots", *extra])


def test_rest_after_the_default_layer_is_a_new_last_linear(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", weights="none", data=str(folder), store=store, workers=0)  # flatten (512)
    r = _fit_rest(store, tmp_path)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    run = featcache.fit(head="rest", store=store, epochs=1, runs=str(tmp_path / "runs"), plots=False)
    head = load_head(run.run_dir)
    assert head.new_layer_ == "fc" and set(head.module_.state_dict()) == {"fc.weight", "fc.bias"}
    assert head.module_.state_dict()["fc.weight"].shape == (3, 512)
    fs = featcache.open_store(store).get_set()
    want = head.predict_proba(fs.features("val").astype(np.float32))
    got = predict(run.run_dir, [folder / p for p in fs.paths("val")], top_k=3)
    for g, w in zip(got, want):  # predict rebuilds the backbone at the default layer, then the head
        assert abs(dict(g.top)[fs.classes[int(w.argmax())]] - w.max()) < 1e-3


def test_timm_rest_after_a_block_and_after_pre_logits(folder, tmp_path):
    timm = pytest.importorskip("timm")
    store = str(tmp_path / "s.zarr")
    maps = featcache.extract(backbone="timm:resnet18", layer="layer3", weights="none", data=str(folder), store=store,
                             workers=0)
    run = featcache.fit(head="rest", set=maps.set_key, store=store, epochs=1, freeze=("layer4.0",), init="random",
                        patience=0, runs=str(tmp_path / "runs"), plots=False)
    state = load_head(run.run_dir).module_.state_dict()
    torch.manual_seed(0)
    before = timm.create_model("resnet18", pretrained=False).state_dict()
    assert state["fc.weight"].shape == (3, 512) and not any(k.startswith(("layer3", "conv1")) for k in state)
    assert torch.equal(state["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])  # frozen, timm's weights
    # trained (timm starts each block's last batch-norm scale at zero, so that is what moves first)
    assert not torch.equal(state["layer4.1.bn2.weight"], before["layer4.1.bn2.weight"])
    assert torch.equal(state["layer4.0.bn2.weight"], before["layer4.0.bn2.weight"])
    fs = featcache.open_store(store).get_set(maps.set_key)
    got = predict(run.run_dir, [folder / p for p in fs.paths("val")[:2]], top_k=1)
    assert len(got) == 2 and all(g.top for g in got)
    default = featcache.extract(backbone="timm:resnet18", weights="none", data=str(folder), store=store, workers=0)
    r = _fit_rest(store, tmp_path, "--set", default.set_key)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_rest_on_a_hugging_face_set_is_one_clear_error(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32)).save_pretrained(model_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone=f"hf:{model_dir}", data=str(folder), store=store, workers=0)
    r = _fit_rest(store, tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert (f"Invalid value for '--head': the rest head cannot continue the Hugging Face model hf:{model_dir}: "
            "featcache cuts it at its outputs") in r.output


def test_a_pooled_set_names_the_layer_to_extract(folder, tmp_path):
    store = str(tmp_path / "s.zarr")
    featcache.extract(backbone="resnet18", layer="layer3", pool="avg", weights="none", data=str(folder), store=store,
                      workers=0)
    r = _fit_rest(store, tmp_path)
    assert r.exit_code == 2 and "Extract with --layer layer3 --pool none." in r.output
