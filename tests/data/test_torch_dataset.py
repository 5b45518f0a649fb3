import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from idml.data import ImageRecord, ImageShardDataset, InvalidImageError, write_dataset

from support import make_records, noise_png


@pytest.fixture
def dataset_root(tmp_path):
    records = make_records(n_classes=5, per_class=3, test_from=3, domains=("a", "b"))
    # Non-contiguous labels so targets differ from labels.
    for r in records:
        r.label = r.label * 10 + 5
    write_dataset(records, tmp_path / "ds", name="tiny", shard_bytes=4000)
    return tmp_path / "ds"


def test_attributes_and_items(dataset_root):
    ds = ImageShardDataset(dataset_root, "test")
    assert len(ds) == 12 and ds.num_classes == 2
    assert sorted(set(ds.labels.tolist())) == [35, 45]
    assert sorted(set(ds.targets.tolist())) == [0, 1]
    assert all((l == 35) == (t == 0) for l, t in zip(ds.labels, ds.targets))
    assert set(ds.domains) == {"a", "b"} and set(ds.class_names) == {"class3", "class4"}
    assert ds.target_names == ["class3", "class4"]
    assert len(ds.ids) == 12 and len(ds.shard_paths) > 1
    image, target = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert target == ds.targets[0] and isinstance(target, int)
    assert ds.image(0).size == (16, 16)


def test_transform_and_dataloader(dataset_root):
    def to_tensor(im):
        return torch.from_numpy(__import__("numpy").asarray(im).copy()).permute(2, 0, 1).float() / 255

    ds = ImageShardDataset(dataset_root, "train", transform=to_tensor)
    batch, targets = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch.shape == (4, 3, 16, 16) and targets.tolist() == ds.targets[:4].tolist()


def test_decode_failure_names_id_and_shard(tmp_path):
    good = ImageRecord("good.png", noise_png(0), 0, "c", "default", "train")
    bad = ImageRecord("bad.png", b"not really an image", 0, "c", "default", "train")
    write_dataset([good, bad], tmp_path / "ds", name="bad")
    ds = ImageShardDataset(tmp_path / "ds", "train")
    assert ds[0][1] == 0
    with pytest.raises(InvalidImageError, match=r"'bad.png'.*part-00000.parquet"):
        ds[1]
