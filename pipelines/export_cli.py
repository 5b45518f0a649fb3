"""``idml export``: a checkpoint as a TorchScript or ONNX file (``idml.export``)."""

from __future__ import annotations

import argparse
import logging


# idml.export.EXPORT_FORMATS, spelled out so that building the parser does not import torch.
FORMATS = ("torchscript", "onnx")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by idml train (best.pt)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="torchscript (torch.jit.load) or onnx (needs the onnx extra: pip install 'idml[onnx]')")
    p.add_argument("--output", required=True, help="file to write")


def run_export(args: argparse.Namespace) -> int:
    from idml.export import export_model

    if not args.verbose:
        for noisy in ("onnx_ir", "onnxscript"):  # the ONNX exporter's line per optimisation pass
            logging.getLogger(noisy).setLevel(logging.WARNING)
    info = export_model(args.checkpoint, args.format, args.output)
    size, dim = info["image_size"], info["embedding_dim"]
    print(f"wrote {info['output']} ({info['format']})")
    print(f"  input  images: float32 (N, 3, {size}, {size}), RGB in [0, 1]; the model normalises inside")
    print(f"  output mu (N, {dim}) L2-normalised, sigma (N, {dim}), uncertainty (N,) = ||sigma||^2")
    if info["max_abs_diff"] is None:
        print("  checked with onnx.checker only: onnxruntime is not installed, outputs not compared with PyTorch")
    else:
        print(f"  outputs match the PyTorch model within {info['max_abs_diff']:.1e} ({info['checked_with']})")
    return 0
