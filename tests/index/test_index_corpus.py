"""Which files an image-folder corpus takes in: links leading out of the folder only on request."""

from pathlib import Path

import pytest
from support import make_image_folder, shape_image

from idml.index import resolve_corpus


def test_links_out_of_the_folder_are_skipped_unless_followed(tmp_path):
    folder = Path(make_image_folder(tmp_path / "imgs", 4))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(shape_image(1))
    (folder / "link.png").symlink_to(tmp_path / "out" / "a.png")
    (folder / "dir-link").symlink_to(tmp_path / "out")
    (folder / "inside.png").symlink_to(folder / "group0" / "pic-00.png")

    corpus = resolve_corpus(str(folder))
    assert sorted(Path(p).relative_to(folder).as_posix() for p in corpus.outside) == ["dir-link/a.png", "link.png"]
    assert corpus.num_rows == 5 and str(folder / "inside.png") in corpus.files
    assert corpus.describe()["outside"] == 2 and corpus.describe()["follow_links"] is False

    followed = resolve_corpus(f"file://{folder}", follow_links=True)
    assert followed.num_rows == 7 and followed.outside == []
    assert followed.fingerprint != corpus.fingerprint  # another set of files, another build


def test_a_corpus_reached_through_a_link_is_inside_itself(tmp_path):
    folder = Path(make_image_folder(tmp_path / "imgs", 3))
    (tmp_path / "alias").symlink_to(folder)
    corpus = resolve_corpus(str(tmp_path / "alias"))
    assert corpus.num_rows == 3 and corpus.outside == []


def test_only_outside_links_is_no_corpus(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "a.png").write_bytes(shape_image(1))
    (tmp_path / "imgs" / "a.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(ValueError, match="1 lie outside the corpus folder"):
        resolve_corpus(str(tmp_path / "imgs"))
