"""Shared fixtures: a tiny learnable image dataset in the project's format, and a config that
trains on it in seconds on a CPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from idml.data import ImageRecord, write_dataset


def class_image(label: int, variant: int, size: int = 32, domain_shift: int = 0) -> bytes:
    """A coloured rectangle whose colour and position depend on the class, plus noise."""
    rng = np.random.default_rng(label * 1000 + variant * 10 + domain_shift)
    base = np.random.default_rng(label).integers(40, 216, 3)
    img = rng.integers(0, 40, (size, size, 3)).astype(np.int16) + 20 * domain_shift
    x0, y0 = (label * 7) % (size // 2), (label * 3) % (size // 2)
    img[y0 : y0 + size // 2, x0 : x0 + size // 2] += base.astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def make_tiny_dataset(root, *, n_classes=12, per_class=4, domains=("a", "b"), size=32, val_classes=(4, 5)):
    """Classes [0, n/2) train (``val_classes`` of them as val), the rest test."""
    records = []
    for label in range(n_classes):
        split = "test" if label >= n_classes // 2 else ("val" if label in val_classes else "train")
        for d, domain in enumerate(domains):
            for i in range(per_class // len(domains) or 1):
                records.append(ImageRecord(id=f"{domain}/{label}/{i}", image=class_image(label, i, size, d),
                                           label=label, class_name=f"class{label}", domain=domain, split=split))
    write_dataset(records, root, name="tiny")
    return str(root)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


TINY_OVERRIDES = [
    "model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=32",
    "data.image_size=32", "train.batch_size=8", "train.images_per_class=2", "train.epochs=2",
    "train.warmup_epochs=1", "train.lr=1e-3", "eval.batch_size=16", "eval.recall_ks=[1,2]",
]


@pytest.fixture
def tiny_overrides(tiny_dataset, tmp_path):
    """``section.key=value`` overrides for a seconds-long run on ``tiny_dataset``."""
    return TINY_OVERRIDES + [f"data.dataset={tiny_dataset}", f"output_dir={tmp_path / 'run'}"]


@pytest.fixture
def tiny_config(tiny_overrides):
    from idml.config import load_config

    return load_config(overrides=tiny_overrides)
