"""The embedder and what a version records of its model."""

import numpy as np
import pyarrow as pa
import torch
from support import CORRUPT_BYTES, make_image_folder, shape_image

from idml.checkpoint import load_checkpoint
from idml.index import resolve_corpus
from idml.index.corpus import read_ids_and_images
from idml.index.embed import BatchEmbedder, describe_checkpoint, model_reference, model_state
from idml.inference import Embedder
from idml.precision import autocast_dtype


def test_embedders_share_the_precision_policy_of_training(checkpoint):
    # the precision policy of training and evaluation (idml.precision), the same for every embedder
    assert issubclass(BatchEmbedder, Embedder) and BatchEmbedder.__init__.__kwdefaults__["precision"] == "auto"
    assert BatchEmbedder(checkpoint, device="cpu", threads=1).autocast_dtype is autocast_dtype("cpu")


def test_an_embedder_from_the_shipped_state_embeds_like_one_from_the_file(checkpoint):
    state = load_checkpoint(checkpoint)
    shipped = model_state({**state, "optimizer": {"big": torch.zeros(10)}})  # a last.pt's extras stay behind
    assert set(shipped) == {"model", "config", "epoch"}
    images = [shape_image(1), shape_image(2)]
    a, _ = BatchEmbedder(shipped, device="cpu", threads=1).embed_images(images)
    b, _ = BatchEmbedder(checkpoint, device="cpu", threads=1).embed_images(images)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_version_records_the_model_as_given(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_reference("models:/tiny@champion") == "models:/tiny@champion"
    assert model_reference("s3://bucket/best.pt") == "s3://bucket/best.pt"
    assert model_reference("best.pt") == str(tmp_path / "best.pt")  # a local path, absolute
    described = describe_checkpoint(checkpoint, ref="runs:/abc/model", model={"model_uri": "runs:/abc/model", "run_id": "abc"})
    assert described["path"] == "runs:/abc/model" and described["model"]["run_id"] == "abc"
    assert describe_checkpoint(checkpoint)["model"] == {"model_uri": checkpoint}


def test_output_rows_name_their_file(checkpoint, tmp_path):
    corpus = resolve_corpus(make_image_folder(tmp_path / "imgs", 2))
    embedder = BatchEmbedder(checkpoint, id_prefix=corpus.root, threads=1)
    out = embedder(read_ids_and_images(corpus, corpus.files[0]))
    assert out.column("file").to_pylist() == [corpus.files[0]]


def test_a_block_is_embedded_in_model_batches_like_image_by_image(checkpoint):
    # Ray hands an actor a whole block of several model batches; the model must only see batch_size.
    images = [shape_image(i) for i in range(7)]
    images[3] = CORRUPT_BYTES
    block = pa.table({"id": [f"img-{i}" for i in range(7)], "image": pa.array(images, pa.binary())})
    embedder = BatchEmbedder(checkpoint, device="cpu", threads=1, batch_size=3)
    sizes, embed = [], embedder.embed_tensors
    embedder.embed_tensors = lambda x: sizes.append(len(x)) or embed(x)
    whole = embedder(block)
    assert max(sizes) <= 3 and sum(sizes) == 6
    one_by_one = pa.concat_tables([BatchEmbedder(checkpoint, device="cpu", threads=1)(block.slice(i, 1)) for i in range(7)])
    assert whole.column("status").to_pylist() == one_by_one.column("status").to_pylist()
    assert whole.column("status").to_pylist()[3] == "corrupt"
    for column in ("mu", "sigma"):
        a, b = whole.column(column).to_pylist(), one_by_one.column(column).to_pylist()
        assert (a[3], b[3]) == (None, None)
        np.testing.assert_allclose(np.array([v for v in a if v]), np.array([v for v in b if v]), atol=1e-5)
