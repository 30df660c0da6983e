"""Hub names on a machine that cannot reach the hub: one ``Error:`` within seconds that says how to
load the model from a folder, instead of minutes of retries; and no foreign progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, make_folder


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FEATCACHE_STORE")
           and "PROXY" not in k.upper()}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_ENDPOINT="http://127.0.0.1:9",  # the discard port: nothing listens, the connection is refused
               HF_HOME=str(tmp_path / "hf-home"))  # an empty local cache
    return env


@pytest.mark.parametrize("backbone,option,names", [
    pytest.param("hf:google/vit-base-patch16-224", "--backbone", "google/vit-base-patch16-224",
                 marks=pytest.mark.skipif(not __import__("importlib").util.find_spec("transformers"),
                                          reason="transformers is not installed")),
    pytest.param("timm:resnet18.a1_in1k", "--weights", "timm/resnet18.a1_in1k",
                 marks=pytest.mark.skipif(not __import__("importlib").util.find_spec("timm"),
                                          reason="timm is not installed")),
])
def test_a_hub_name_without_a_network_is_one_error_that_says_what_to_do(tmp_path, backbone, option, names):
    data = make_folder(tmp_path / "data", splits=(("train", 2),))
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--backbone", backbone, "--data", str(data),
                        "--store", str(tmp_path / "s.zarr"), "--workers", "0"],
                       cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '{option}'"), p.stderr
    assert "the Hugging Face hub cannot be reached from here" in last and f"hf download {names} --local-dir DIR" in last
    assert "HF_HUB_OFFLINE=1" in last
    assert "Retrying" not in p.stderr and "Traceback" not in p.stderr


def test_loading_a_hugging_face_folder_draws_no_bar_of_its_own(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    vit.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    code = f"from featcache.backbones import create_backbone; create_backbone('hf:{tmp_path / 'vit'}', weights='DEFAULT')"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert "Loading weights" not in p.stderr and "it/s" not in p.stderr, p.stderr
