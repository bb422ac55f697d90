"""What a run trains and how: the trainable parameters, the optimizer and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ttcompress.errors import UserInputError
from ttcompress.training.config import TrainConfig

__all__ = ["make_optimizer", "make_scheduler", "set_trainable"]


def _decomposed_names(model: nn.Module) -> list[str]:
    meta = getattr(model, "ttcompress_meta", None)
    layers = (meta or {}).get("layers") or {}
    return list(layers)


def set_trainable(model: nn.Module, train_only: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` by ``train_only`` (``"all"`` or ``"decomposed"``); the trainable parameters.

    ``"decomposed"`` trains only the layers listed in ``model.ttcompress_meta["layers"]``.
    """
    if train_only == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    names = _decomposed_names(model)
    if not names:
        raise UserInputError("train_only='decomposed' but the model has no decomposed layers (ttcompress_meta['layers'] is empty)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        try:
            sub = model.get_submodule(name)
        except AttributeError as exc:
            raise UserInputError(f"decomposed layer {name!r} listed in the metadata is not in the model") from exc
        for p in sub.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``params``."""
    if not params:
        raise UserInputError("the model has no trainable parameters")
    wd = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=wd)
    return torch.optim.Adadelta(params, lr=config.lr, weight_decay=wd)


def make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> Any:
    """The per-epoch learning-rate schedule named by ``config.schedule`` (None for ``"none"``)."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    return None
