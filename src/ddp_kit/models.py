"""Models by name: two small built-ins for the demo and tests, every torchvision classification model, and the
user's own by import path."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .config import ConfigError, ModelConfig, did_you_mean
from .plugins import check_call, import_object, is_import_path


class SmallCNN(nn.Module):
    """Three conv blocks with BatchNorm and a linear head; trains the 32x32 digits demo to >0.95 in a few epochs."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten -> hidden -> classes, without normalization layers: its gradients do not depend on how a batch is
    split, which makes it the model for equivalence tests (accumulation vs. larger batches)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BUILTIN_MODELS = {"small_cnn": SmallCNN, "mlp": MLP}


def _torchvision_model_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d so the network takes `in_channels` inputs (torchvision models assume 3)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                setattr(parent, name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None, child.padding_mode))
                return
    raise ConfigError(f"model has no Conv2d to adapt to model.in_channels={in_channels}")


def model_factory(cfg: ModelConfig) -> Callable[[], nn.Module]:
    """A function building `cfg.name` afresh, checked now: the name resolves and `cfg.kwargs` fits its signature
    (before any process group starts; the model itself is built later, after seeding, on every rank)."""
    if is_import_path(cfg.name):
        factory = import_object(cfg.name, "model.name")
        check_call(factory, cfg.kwargs, "model.kwargs", cfg.name)
        return functools.partial(_user_model, factory, cfg.name, cfg.kwargs)
    if cfg.name in BUILTIN_MODELS:
        factory = BUILTIN_MODELS[cfg.name]
        check_call(factory, {"in_channels": cfg.in_channels, "num_classes": cfg.num_classes, **cfg.kwargs},
                   "model.kwargs", cfg.name)
        return functools.partial(factory, cfg.in_channels, cfg.num_classes, **cfg.kwargs)
    names = _torchvision_model_names()
    if cfg.name not in names:
        raise ConfigError(f"model.name={cfg.name!r} is unknown: {did_you_mean(cfg.name, list(BUILTIN_MODELS) + names)}"
                          f"use small_cnn, mlp, a torchvision classification model (torchvision.models.list_models()) "
                          f"or your own as 'package.module:Class'")
    return functools.partial(_torchvision_model, cfg.name, cfg.num_classes, cfg.in_channels, cfg.kwargs)


def _user_model(factory: Callable, name: str, kwargs: dict) -> nn.Module:
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs={kwargs!r} do not fit torchvision's {name}: {exc}") from None
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def build_model(cfg: ModelConfig, example_input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Build `cfg.name` (see `model_factory`), randomly initialized.

    `example_input_shape` (C, H, W) materializes lazily-sized layers, so every rank holds real parameters before
    DDP broadcasts them."""
    model = model_factory(cfg)()
    if example_input_shape is not None and any(
            isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        with torch.no_grad():
            model(torch.zeros(1, *example_input_shape))
    return model
