from PIL import Image

from idml.data import resolve_dataset, save_sample_grid, summarize, write_dataset, ConversionReport

from support import make_emoji_tarballs, make_records


def test_summarize(tmp_path):
    report = ConversionReport()
    report.skip("truncated", "x/broken.jpg")
    report.empty_classes.append("ghost")
    write_dataset(make_records(domains=("a", "b")), tmp_path / "ds", name="tiny", report=report)
    text = summarize(tmp_path / "ds")
    lines = text.splitlines()
    assert "tiny" in lines[0]
    train = next(l for l in lines if l.startswith("train")).split()
    assert train[:5] == ["train", "12", "2", "2", "1"]
    assert "truncated: 1" in text and "x/broken.jpg" in text and "ghost" in text


def test_save_sample_grid(tmp_path):
    root = resolve_dataset("emoji", cache_dir=tmp_path / "cache", tarball_dir=make_emoji_tarballs(tmp_path / "t"))
    out = save_sample_grid(root, tmp_path / "grid" / "emoji.png", split="test", n_classes=2)
    im = Image.open(out)
    assert im.format == "PNG" and im.width > im.height  # 2 rows x 4 vendor columns
