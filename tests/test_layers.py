"""Several layers in one pass: one set per layer, each bit-identical to extracting that layer alone."""

import importlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featcache
from featcache.backbones import create_backbone, create_joint, list_layers, parse_layers
from featcache.cli import main
from featcache.errors import UnknownLayer

from .helpers import TINY, make_folder

EXTRACT = importlib.import_module("featcache.extract")  # the module, not the function featcache.extract
COMPUTE = importlib.import_module("featcache.compute")


def _count_forward(monkeypatch) -> list[int]:
    """The number of images each pass through the network was given."""
    real, passes = COMPUTE.run_backbone, []

    def counted(backbone, root, items, **kw):
        passes.append(len(items))
        return real(backbone, root, items, **kw)

    monkeypatch.setattr(COMPUTE, "run_backbone", counted)
    return passes


def _rows(store: str, key: str) -> dict[str, np.ndarray]:
    fs = featcache.open_store(store).get_set(key)
    return {s: (fs.hashes(s), fs.features(s)) for s in fs.splits}


def _same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for s in a:
        assert list(a[s][0]) == list(b[s][0])
        assert a[s][1].dtype == b[s][1].dtype and a[s][1].tobytes() == b[s][1].tobytes()  # bit for bit


@pytest.fixture
def small(tmp_path):
    return make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))


@pytest.mark.parametrize("backbone, layers", [
    ("resnet18", ("layer3", "layer4", "flatten")),
    ("timm:resnet18", ("layer3", "pre_logits")),  # the embedding with a hook on layer3
    ("timm:resnet18", ("layer1.0.add", "layer4")),  # one traced graph
])
def test_one_pass_writes_the_rows_each_layer_alone_writes(tmp_path, small, monkeypatch, backbone, layers):
    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    kw = dict(backbone=backbone, weights="none", data=str(small), workers=0, dtype="float32")
    passes = _count_forward(monkeypatch)
    both = featcache.extract(layer=list(layers), store=str(tmp_path / "both.zarr"), **kw)
    assert passes == [9]  # every image through the network once, for all layers
    assert isinstance(both, featcache.extracted.LayersResult) and [r.layer for r in both] == list(layers)
    assert len(set(both.set_keys)) == len(layers)
    for layer, r in zip(layers, both):
        alone = featcache.extract(layer=layer, store=str(tmp_path / f"{layer}.zarr"), **kw)
        assert (alone.set_key, alone.space, alone.shape) == (r.set_key, r.space, r.shape)  # the same feature space
        _same_rows(_rows(str(tmp_path / "both.zarr"), r.set_key), _rows(str(tmp_path / f"{layer}.zarr"), r.set_key))
        attrs = featcache.open_store(str(tmp_path / "both.zarr")).get_set(r.set_key).attrs
        assert attrs["layer"] == layer and attrs["config"]["layer"] == layer  # each set records its own layer


def test_the_joint_model_returns_what_each_cut_returns():
    torch = pytest.importorskip("torch")
    x = torch.rand(2, 3, 224, 224)
    joint = create_joint("resnet18", ["layer2", "layer4", None], "none", "avg")
    assert [(p.layer, p.pool, p.shape) for p in joint.parts] == [
        ("layer2", "avg", (128,)), ("layer4", "avg", (512,)), ("flatten", "none", (512,))]
    with torch.no_grad():
        outs = joint.model(x)
        for layer, part, out in zip(["layer2", "layer4", None], joint.parts, outs):
            alone = create_backbone("resnet18", layer, "none", "avg")
            assert alone.provenance() == part.provenance()
            assert torch.equal(alone.model(x), out)


def test_rows_cached_for_one_layer_are_reused_and_only_missing_rows_written(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)))
    store = str(tmp_path / "s.zarr")
    kw = dict(backbone=TINY, weights="none", data=str(data), store=store, workers=0)
    first = featcache.extract(layer="features", **kw)
    assert first.extracted == 9
    make_folder(tmp_path / "data", splits=(("train", 1),), seed=7, classes={"red": (200, 0, 0)})  # red_0 rewritten
    passes = _count_forward(monkeypatch)
    st = featcache.open_store(store)
    segments = len(st.segment_groups(first.space))
    r = featcache.extract(layer="features,avgpool", **kw)
    features, avgpool = r
    assert passes == [9]  # the images that avgpool misses (all of them) go through once
    assert (features.extracted, features.reused) == (1, 8)  # only the rewritten image is new at features
    assert (avgpool.extracted, avgpool.reused) == (9, 0)
    assert len(featcache.open_store(store).segment_groups(first.space)) == segments + 1  # one new segment, one row
    again = featcache.extract(layer=["features", "avgpool"], **kw)
    assert passes == [9] and [x.extracted for x in again] == [0, 0]  # nothing left to compute: no pass at all
    assert "2 layers, one pass: 0 images through the network" in again.summary()


def test_hf_outputs_in_one_pass(tmp_path, small, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    folder = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    kw = dict(backbone=f"hf:{folder}", data=str(small), workers=0, dtype="float32")
    passes = _count_forward(monkeypatch)
    both = featcache.extract(layer="pooler_output,hidden_states.1,cls", store=str(tmp_path / "b.zarr"), **kw)
    assert passes == [9]
    for r in both:
        alone = featcache.extract(layer=r.layer, store=str(tmp_path / "a.zarr"), **kw)
        _same_rows(_rows(str(tmp_path / "b.zarr"), r.set_key), _rows(str(tmp_path / "a.zarr"), alone.set_key))


def test_layer_lists_are_parsed_and_checked():
    assert parse_layers(None) is None and parse_layers("layer3") == "layer3"
    assert parse_layers("layer3, layer4") == ("layer3", "layer4") and parse_layers(["layer3"]) == ("layer3",)
    with pytest.raises(UnknownLayer, match=r"--layer takes a layer name or several, e\.g\. layer3,layer4; got 'a,,b'"):
        parse_layers("a,,b")
    with pytest.raises(UnknownLayer, match="--layer names layer3 more than once; name each layer once"):
        featcache.ExtractConfig(backbone="resnet18", layer=["layer3", "layer4", "layer3"])
    assert featcache.ExtractConfig(backbone="resnet18", layer="layer3,layer4").to_dict()["layer"] == ["layer3", "layer4"]


def test_cli_takes_a_comma_list_and_names_a_bad_layer(tmp_path):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)))
    store = str(tmp_path / "s.zarr")
    base = ["extract", "--backbone", TINY, "--weights", "none", "--data", str(data), "--store", store, "--workers", "0"]
    runner = CliRunner()
    ok = runner.invoke(main, base + ["--layer", "features,classifier.1"])
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.strip().splitlines()
    assert lines[0].startswith("features: set ") and lines[1].startswith("classifier.1: set ")
    assert lines[2].startswith("2 layers, one pass: 9 images through the network")
    assert lines[3] == f"next: featcache fit --set {lines[0].split()[2].rstrip(':')} --store {store}"
    doc = json.loads(runner.invoke(main, base + ["--layer", "features,classifier.1", "--json"]).stdout)
    assert [d["layer"] for d in doc["sets"]] == ["features", "classifier.1"] and doc["computed"] == 0
    assert all(d["reused"] == 9 for d in doc["sets"]) and doc["next"].startswith("featcache fit --set ")
    bad = runner.invoke(main, base + ["--layer", "features,,avgpool"])
    assert bad.exit_code == 2 and "Invalid value for '--layer': --layer takes a layer name or several" in bad.output
    unknown = runner.invoke(main, base + ["--layer", "features,nope"])
    assert unknown.exit_code == 2 and "Unknown layer 'nope' for tests.tiny_backbone:tiny_cnn" in unknown.output
    assert "Traceback" not in bad.output + unknown.output


def test_augmented_views_of_several_layers_in_one_pass(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)))
    kw = dict(backbone=TINY, weights="none", data=str(data), workers=0, views=2, dtype="float32")
    passes = _count_forward(monkeypatch)
    both = featcache.extract(layer="features,avgpool", store=str(tmp_path / "b.zarr"), **kw)
    assert passes == [9, 12]  # the images once, then 2 views of each of the 6 training images once
    for r in both:
        alone = featcache.extract(layer=r.layer, store=str(tmp_path / f"{r.layer}.zarr"), **kw)
        a = featcache.open_store(str(tmp_path / "b.zarr")).get_set(r.set_key).view_features()
        b = featcache.open_store(str(tmp_path / f"{r.layer}.zarr")).get_set(alone.set_key).view_features()
        assert r.views_extracted == 12 and a.shape[:2] == (6, 2) and a.tobytes() == b.tobytes()


def test_model_processes_carry_several_layers_bit_for_bit(tmp_path, monkeypatch):
    """Forked model processes (the CPU default) send a joint's outputs as one flat array per batch:
    split back, each layer's rows equal that layer extracted alone in one process."""
    from featcache import procs

    monkeypatch.setattr(procs, "usable_cores", lambda: 2)
    monkeypatch.setattr(procs, "_available_memory", lambda: None)
    data = make_folder(tmp_path / "data", splits=(("train", 8), ("val", 4)))  # 36 images: batches of 16, 16, 4
    kw = dict(backbone=TINY, weights="none", data=str(data), dtype="float32", batch_size=16)
    joint = featcache.extract(layer="features,avgpool", store=str(tmp_path / "joint.zarr"), **kw)
    assert [r.timings.get("processes") for r in joint] == [2.0, 2.0]
    for r in joint:
        alone = featcache.extract(layer=r.layer, store=str(tmp_path / f"{r.layer}.zarr"), workers=0, **kw)
        for split in ("train", "val"):
            a = featcache.open_store(str(tmp_path / "joint.zarr")).get_set(r.set_key).to_numpy(split)
            b = featcache.open_store(str(tmp_path / f"{r.layer}.zarr")).get_set(alone.set_key).to_numpy(split)
            assert a[0].dtype == np.float32 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _vit(folder):
    """A tiny Hugging Face ViT folder (random weights, 32 px), as a user's local model."""
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return f"hf:{folder}"


def _passes_apart(model) -> int:
    """How many parts a joint model computes outside its first pass (0: all in one pass)."""
    from featcache.backbones.base import Assembled, Separate

    if isinstance(model, Separate):
        return len(model.cuts)
    if isinstance(model, Assembled):
        return sum(len(p) for p in model.places[1:])
    return 0


@pytest.mark.parametrize("backbone", [
    pytest.param("resnet18", marks=pytest.mark.slow),
    pytest.param("vgg16", marks=pytest.mark.slow),
    pytest.param("timm:resnet18", marks=pytest.mark.slow),  # pre_logits (hooks) beside every traced layer
    "vit",
])
def test_every_layer_in_one_pass_is_bit_for_bit_that_layer_alone(tmp_path, backbone):
    """The attack of issue 24: one pass over every layer ``featcache layers`` lists (in-place ReLU after a batch
    norm, ``x += shortcut``, a module prefix and its last node, views), each part against its own cut."""
    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    name = _vit(tmp_path / "vit") if backbone == "vit" else backbone
    layers = list_layers(name)
    assert len(layers) > 5
    joint = create_joint(name, layers, "none")
    assert [p.layer for p in joint.parts] == layers
    side = 32 if backbone == "vit" else 64  # aliasing does not depend on the input size; 64 px keeps it fast
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = joint.model(x)
        wrong = [p.layer for p, out in zip(joint.parts, outs) if not torch.equal(out, p.model(x))]
    assert wrong == []
    if backbone in ("resnet18", "vgg16"):
        assert _passes_apart(joint.model) == 0  # nothing needed a pass of its own: the copies are enough
    if backbone == "timm:resnet18":
        assert _passes_apart(joint.model) < len(layers) // 4  # most layers hooked beside the embedding
    if backbone == "resnet18":  # the parts are the cuts create_backbone makes
        with torch.no_grad():
            for layer in ("layer1.0.bn1", "layer1.0.bn2", "layer1"):
                assert torch.equal(create_backbone(name, layer, "none").model(x), outs[layers.index(layer)])


class _Aliased(torch.nn.Module):
    """A view returned beside an in-place op on its base, and a node that reads a tensor after a node it does not
    need alone (``act``, in place) wrote to it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.act = torch.nn.ReLU(inplace=True)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        flat = y.flatten(1)  # a view of y
        z = self.act(y)  # writes y, so flat, in place
        scaled = flat * 2  # alone: 2 * conv; after act ran: 2 * relu(conv)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(z, 1), 1)) + scaled.mean()


def test_in_place_writes_on_views_and_inputs_never_reach_another_layer():
    from torchvision.transforms._presets import ImageClassification

    tf = ImageClassification(crop_size=8, resize_size=8)
    layers = ["flatten", "act", "mul"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Aliased()
    joint = create_joint(model, layers, transform=tf)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) - 0.5
    with torch.no_grad():
        outs = joint.model(x)
        alone = [create_backbone(model, layer, transform=tf).model(x) for layer in layers]
    for layer, a, b in zip(layers, alone, outs):
        assert torch.equal(a, b), layer
    assert (alone[0] < 0).any()  # the view alone keeps the negatives the in-place ReLU removes later
    assert _passes_apart(joint.model) == 1  # mul reads y after act wrote it: computed on its own


def test_joint_extract_then_one_layer_computes_the_right_rows(tmp_path):
    """Issue 24, end to end: ``--layer layer1.0.bn1,layer4`` stored rows after the in-place ReLU under
    layer1.0.bn1's space, and a later ``--layer layer1.0.bn1`` reused them."""
    data = make_folder(tmp_path / "data", splits=(("train", 2), ("val", 1)), size=(20, 28))
    kw = dict(backbone="resnet18", weights="none", data=str(data), workers=0, dtype="float32")
    shared = str(tmp_path / "shared.zarr")
    featcache.extract(layer="layer1.0.bn1,layer4", store=shared, **kw)
    again = featcache.extract(layer="layer1.0.bn1", store=shared, **kw)
    assert again.extracted == 0  # the rows are the cache ...
    fresh = featcache.extract(layer="layer1.0.bn1", store=str(tmp_path / "fresh.zarr"), **kw)
    _same_rows(_rows(shared, again.set_key), _rows(str(tmp_path / "fresh.zarr"), fresh.set_key))  # ... and right
