"""What a run trains and how: the trainable parameters, the optimizer and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

import math

import torch
from torch import nn

from ttcompress.checkpoint.meta import read_meta
from ttcompress.errors import UserInputError
from ttcompress.training.config import TrainConfig

__all__ = ["make_optimizer", "make_scheduler", "param_groups", "set_trainable"]


def _decomposed_names(model: nn.Module) -> list[str]:
    return list(read_meta(model).layers)


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


def param_groups(model: nn.Module, params: list[nn.Parameter], config: TrainConfig) -> list[dict[str, Any]]:
    """``params`` as optimizer groups: the decomposed layers' at ``lr × decomposed_lr_scale``, the rest at ``lr``.

    One group when the scale is 1 or one side is empty.
    """
    if config.decomposed_lr_scale == 1.0:
        return [{"params": params}]
    decomposed = {id(p) for name in _decomposed_names(model) for p in model.get_submodule(name).parameters()}
    ours = [p for p in params if id(p) in decomposed]
    rest = [p for p in params if id(p) not in decomposed]
    groups = [{"params": rest}] if rest else []
    if ours:
        groups.append({"params": ours, "lr": config.lr * config.decomposed_lr_scale})
    return groups


def make_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config.optimizer`` over ``params`` (parameters, or groups as from :func:`param_groups`)."""
    if not params or all(isinstance(g, dict) and not g["params"] for g in params):
        raise UserInputError("the model has no trainable parameters")
    wd = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=wd)
    return torch.optim.Adadelta(params, lr=config.lr, weight_decay=wd)


def make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int = 1) -> Any:
    """The learning-rate schedule named by ``config.schedule`` (None for ``"none"``).

    ``warmup-cosine`` is stepped after every optimizer step (``steps_per_epoch × epochs`` in all),
    the others once per epoch.
    """
    if config.schedule == "warmup-cosine":
        total = max(1, steps_per_epoch * config.epochs)
        return torch.optim.lr_scheduler.LambdaLR(opt, _WarmupCosine(total=total, warmup=round(config.warmup * total)))
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    return None


class _WarmupCosine:
    """LR factor at step ``t``: linear from 1/warmup to 1 over ``warmup`` steps, then cosine from 1 to 0 at ``total``.

    A class rather than a closure so that ``LambdaLR.state_dict`` can save it.
    """

    def __init__(self, *, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - self.warmup) / span)))
