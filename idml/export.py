"""A trained checkpoint as a self-contained model file (TorchScript or ONNX) for runtimes without
idml: float images in, ``(mu, sigma, uncertainty)`` out.

Input: float32 NCHW RGB in [0, 1] at the checkpoint's ``data.image_size`` (the square that
``idml.transforms.eval_transform`` produces: resize the short side to round(size * 256 / 224),
centre-crop ``size``, divide the uint8 pixels by 255). The backbone's mean/std normalisation is
inside the exported model, as in ``IDMLModel``; do not normalise the input again. The batch size
is free. Outputs: ``mu`` (N, D), L2-normalised; ``sigma`` (N, D); ``uncertainty`` (N,) =
||sigma||^2, what the index stores and the introspective re-rank uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import load_checkpoint, model_from_checkpoint
from .files import file_sha256
from .metric import image_uncertainty

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")
METADATA_NAME = "idml.json"  # TorchScript extra file / ONNX metadata key
OUTPUT_NAMES = ("mu", "sigma", "uncertainty")
# float32 round-off between the eager model and the exported graph (ONNX Runtime fuses ops)
TOLERANCE = 1e-4


class ExportableModel(nn.Module):
    """``IDMLModel`` with the uncertainty as a third output, for float [0, 1] images only (the
    uint8 branch of ``IDMLModel`` is a data-dependent branch that tracing would freeze)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, sigma = self.model(images)
        return mu, sigma, image_uncertainty(sigma)


def export_metadata(checkpoint: str | Path, state: dict[str, Any], image_size: int, embedding_dim: int) -> dict[str, Any]:
    """What a consumer of the file needs to feed it (stored inside the file)."""
    return {"checkpoint_sha256": file_sha256(checkpoint), "epoch": state.get("epoch"), "image_size": image_size,
            "embedding_dim": embedding_dim, "input": "float32 NCHW RGB in [0, 1], image_size x image_size "
            "(resize short side to round(image_size * 256 / 224), centre crop); normalised inside",
            "outputs": list(OUTPUT_NAMES)}


def export_model(checkpoint: str | Path, fmt: str, output: str | Path) -> dict[str, Any]:
    """Write ``checkpoint``'s model to ``output`` as ``fmt`` and check that the file's outputs
    match the PyTorch model's on a random batch; returns the metadata plus ``max_abs_diff``
    (``checked_with`` says which runtime ran the file)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    output = Path(output)
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; give a file name")
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(state)
    module = ExportableModel(model)
    size = cfg.data.image_size
    metadata = export_metadata(checkpoint, state, size, cfg.model.embedding_dim)
    # Two images: a batch of one would let the exporter specialise the batch dimension to 1. The
    # check runs on three other images, so a batch size frozen into the graph would fail it.
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    check = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        _export_torchscript(module, example, output, metadata)
    else:
        _export_onnx(module, example, output, metadata)
    with torch.inference_mode():
        expected = module(check)
    try:
        actual, checked_with = run_exported(output, check.numpy())
    except ImportError:
        # The file passed onnx.checker; without a runtime its outputs cannot be compared.
        log.warning("onnxruntime is not installed: %s passed onnx.checker but its outputs were not compared "
                    "with PyTorch (pip install onnxruntime)", output)
        return {**metadata, "format": fmt, "output": str(output), "max_abs_diff": None, "checked_with": "onnx.checker"}
    diff = max(float((torch.as_tensor(a) - e).abs().max()) for a, e in zip(actual, expected))
    if diff > TOLERANCE:
        raise RuntimeError(f"the exported {fmt} model differs from the PyTorch model by {diff:.2e} (> {TOLERANCE:g})")
    return {**metadata, "format": fmt, "output": str(output), "max_abs_diff": diff, "checked_with": checked_with}


def _export_torchscript(module: nn.Module, example: torch.Tensor, output: Path, metadata: dict) -> None:
    with _torchscript_deprecation_silenced(), torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(output), _extra_files={METADATA_NAME: json.dumps(metadata)})


@contextlib.contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    # torch >= 2.10 warns that TorchScript is deprecated on every call; here it was asked for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def _export_onnx(module: nn.Module, example: torch.Tensor, output: Path, metadata: dict) -> None:
    try:
        import onnx
    except ImportError as e:
        raise ValueError("ONNX export needs the onnx extra: pip install 'idml[onnx]'") from e
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(module, (example,), input_names=["images"], output_names=list(OUTPUT_NAMES),
                                dynamic_shapes={"images": {0: batch}}, dynamo=True, verbose=False)
    program.save(str(output))
    proto = onnx.load(str(output))
    onnx.checker.check_model(proto, full_check=True)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(metadata)
    onnx.save(proto, str(output))


def run_exported(path: str | Path, images) -> tuple[list, str]:
    """Run an exported file on float NCHW ``images`` (numpy): ``([mu, sigma, uncertainty],
    runtime)``. ONNX runs in onnxruntime (ImportError without it)."""
    path = Path(path)
    if _is_onnx(path):
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(list(OUTPUT_NAMES), {"images": images}), f"onnxruntime {ort.__version__}"
    with _torchscript_deprecation_silenced():
        loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return [t.numpy() for t in loaded(torch.from_numpy(images))], f"torch.jit {torch.__version__}"


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored in an exported file."""
    path = Path(path)
    if _is_onnx(path):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_NAME])
    extra = {METADATA_NAME: ""}
    with _torchscript_deprecation_silenced():
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_NAME])


def _is_onnx(path: Path) -> bool:
    # TorchScript files are zip archives; ONNX files are protobuf (never start with "PK").
    with open(path, "rb") as f:
        return f.read(2) != b"PK"
