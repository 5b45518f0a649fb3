"""Image transforms: PIL RGB in, uint8 CHW tensor out (the model scales and normalises)."""

from __future__ import annotations

from torchvision.transforms import v2


def train_transform(image_size: int) -> v2.Compose:
    # A milder crop than ImageNet's (0.08, 1): small fine-grained images lose their identity
    # when cropped to a tenth.
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def eval_transform(image_size: int) -> v2.Compose:
    # Resize(256) + CenterCrop(224) of the paper, at any size.
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(image_size * 256 / 224), antialias=True),
        v2.CenterCrop(image_size),
    ])
