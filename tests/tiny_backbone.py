"""A tiny CNN for fast tests, used as ``--backbone tests.tiny_backbone:tiny_cnn``."""

from torch import nn
from torchvision.transforms._presets import ImageClassification


class TinyCNN(nn.Module):
    transforms = ImageClassification(crop_size=32, resize_size=32)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def tiny_cnn() -> nn.Module:
    return TinyCNN()
