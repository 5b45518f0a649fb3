"""``idml export``: the exported TorchScript and ONNX files give the PyTorch model's mu, sigma and
uncertainty on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import make_checkpoint, shape_image

from idml.checkpoint import model_from_checkpoint
from idml.data.images import decode_image
from idml.export import EXPORT_FORMATS, export_model, read_metadata, run_exported
from idml.transforms import eval_transform


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export") / "tiny.pt")


def _images(size: int, n: int = 5) -> torch.Tensor:
    """Real query images as the service prepares them: decoded, resized, centre-cropped (uint8)."""
    transform = eval_transform(size)
    return torch.stack([transform(decode_image(shape_image(seed))) for seed in range(n)])


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_exported_model_matches_pytorch(checkpoint, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime runs the ONNX file (pip install 'idml[onnx]')")
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    info = export_model(checkpoint, fmt, out)
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] < 1e-4

    model, cfg = model_from_checkpoint(checkpoint)
    images = _images(cfg.data.image_size)
    with torch.inference_mode():
        mu, sigma = model(images)  # uint8: the model scales and normalises inside
    exported_mu, exported_sigma, exported_u = run_exported(out, (images.float() / 255).numpy())[0]
    np.testing.assert_allclose(exported_mu, mu.numpy(), atol=1e-5)
    np.testing.assert_allclose(exported_sigma, sigma.numpy(), atol=1e-5)
    np.testing.assert_allclose(exported_u, sigma.pow(2).sum(1).numpy(), rtol=1e-4)
    assert exported_mu.shape == (5, cfg.model.embedding_dim)  # traced with 2 images, run on 5

    meta = read_metadata(out)
    assert meta["image_size"] == cfg.data.image_size and meta["outputs"] == ["mu", "sigma", "uncertainty"]
    assert meta["checkpoint_sha256"] == info["checkpoint_sha256"]


def test_bad_requests_are_clear(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(checkpoint, "tflite", tmp_path / "m.tflite")
    with pytest.raises(IsADirectoryError, match="give a file name"):
        export_model(checkpoint, "torchscript", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(tmp_path / "missing.pt", "torchscript", tmp_path / "m.pt")


def test_idml_export_command(checkpoint, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.export_cli import FORMATS

    assert FORMATS == EXPORT_FORMATS  # the parser's copy (it must not import torch)
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (torchscript)" in printed and "float32 (N, 3, 32, 32), RGB in [0, 1]" in printed
    assert "outputs match the PyTorch model" in printed
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx", "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
