"""The plain end-to-end transfer-learning script featcache is measured against, as a user writes it.

A frozen torchvision backbone (eval mode, no grad) runs on every image of every epoch from an
``ImageFolder`` + ``DataLoader`` with workers; a linear (or mlp) head trains on its output with
Adam; validation runs after every epoch. It imports nothing from featcache.

    python benchmarks/e2e_script.py --data DIR --backbone resnet18 --weights none --epochs 10
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="folder with train/ and val/ class folders")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--weights", default="DEFAULT", help="DEFAULT or none")
    ap.add_argument("--head", default="linear", choices=["linear", "mlp"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()

    torch.manual_seed(0)
    weights = None if args.weights == "none" else torchvision.models.get_model_weights(args.backbone).DEFAULT
    model = torchvision.models.get_model(args.backbone, weights=weights)
    transform = (weights or torchvision.models.get_model_weights(args.backbone).DEFAULT).transforms()
    dim = model.fc.in_features
    model.fc = nn.Identity()
    model.eval().requires_grad_(False)

    train = datasets.ImageFolder(os.path.join(args.data, "train"), transform)
    val = datasets.ImageFolder(os.path.join(args.data, "val"), transform)
    loaders = {
        "train": DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers),
        "val": DataLoader(val, args.batch_size, num_workers=args.workers),
    }
    classes = len(train.classes)
    head = nn.Linear(dim, classes) if args.head == "linear" else nn.Sequential(
        nn.Linear(dim, 256), nn.ReLU(), nn.Dropout(0.4), nn.Linear(256, classes))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        head.train()
        for x, y in loaders["train"]:
            with torch.no_grad():
                z = model(x)
            opt.zero_grad()
            loss_fn(head(z), y).backward()
            opt.step()
        head.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in loaders["val"]:
                correct += int((head(model(x)).argmax(1) == y).sum())
                total += len(y)
        print(f"epoch {epoch}: val acc {correct / total:.4f}, {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
