"""Entry points: :func:`train` and :func:`finetune` on models in memory, :func:`train_arch` and
:func:`finetune_file` on architecture names and model files (what the CLI runs)."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
from torch import nn

from ttcompress.checkpoint import io as tio
from ttcompress.data import DatasetBundle, load_dataset, text_tokenizer
from ttcompress.errors import UserInputError
from ttcompress.fsutil import check_not_inputs
from ttcompress.checkpoint.models import build_arch
from ttcompress.checkpoint.teacher import load_teacher
from ttcompress.training.config import FinetuneConfig, TrainConfig
from ttcompress.training.loop import fit
from ttcompress.training.records import TrainCallback, TrainResult

__all__ = ["finetune", "finetune_file", "fit_arch_kwargs", "train", "train_arch"]


def train(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    output: str | os.PathLike[str],
    config: TrainConfig | None = None,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a (dense) model from its current weights, usually fresh from :func:`build_arch`.

    Same as :func:`~ttcompress.training.loop.fit` with :class:`TrainConfig` defaults.
    """
    return fit(model, bundle, output=output, config=config or TrainConfig(), teacher=teacher,
               progress=progress, resume=resume, mode="train")  # fmt: skip


def finetune(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    output: str | os.PathLike[str],
    config: FinetuneConfig | TrainConfig | None = None,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Fine-tune a (compressed) model; same as :func:`~ttcompress.training.loop.fit` with :class:`FinetuneConfig` defaults."""
    return fit(model, bundle, output=output, config=config or FinetuneConfig(), teacher=teacher,
               progress=progress, resume=resume, mode="finetune")  # fmt: skip


def fit_arch_kwargs(name: str, kwargs: Mapping[str, Any] | None, bundle: DatasetBundle) -> dict[str, Any]:
    """Fill a built-in architecture's shape kwargs from the dataset (explicit kwargs win).

    ``seed-cnn``/``lenet5`` get ``num_classes``, ``in_channels`` and ``input_size``; ``seed-fc3``
    gets ``num_classes`` and ``in_features``; ``torchvision:NAME`` gets ``num_classes`` unless
    ``weights`` are requested. Other names are left alone.
    """
    kw = dict(kwargs or {})
    key = name.strip().lower()
    c, h, w = (tuple(bundle.input_shape) + (1, 1, 1))[:3]
    if bundle.num_classes is None:  # no class labels: nothing to fill in
        return kw
    if key in ("seed-cnn", "lenet5"):
        kw.setdefault("num_classes", bundle.num_classes)
        kw.setdefault("in_channels", int(c))
        if h == w:
            kw.setdefault("input_size", int(h))
    elif key == "seed-fc3":
        kw.setdefault("num_classes", bundle.num_classes)
        kw.setdefault("in_features", int(math.prod(bundle.input_shape)))
    elif key.startswith("torchvision:") and "weights" not in kw:
        kw.setdefault("num_classes", bundle.num_classes)
    return kw


def train_arch(
    arch: str,
    *,
    output: str | os.PathLike[str],
    arch_kwargs: Mapping[str, Any] | None = None,
    data: str = "mnist-5k",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    config: TrainConfig | None = None,
    teacher: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    progress: TrainCallback | None = None,
    resume: bool = False,
) -> TrainResult:
    """Build ``arch`` (seeded with ``config.seed``), then :func:`train` it on dataset ``data``.

    What ``ttcompress train`` runs. Built-in shape kwargs are filled from the dataset
    (:func:`fit_arch_kwargs`), so ``seed-cnn`` works on CIFAR-10 as well.
    """
    cfg = config or TrainConfig()
    bundle = load_dataset(data, root=data_root, download=download, image_size=image_size)
    torch.manual_seed(cfg.seed)
    model = build_arch(arch, kwargs=fit_arch_kwargs(arch, arch_kwargs, bundle))
    teacher_model = None
    if teacher is not None:  # a state-dict teacher gets the student's architecture
        teacher_model = load_teacher(teacher, student=model, student_arch=arch, trust_pickle=trust_pickle,
                                     trust_code=trust_code)
    return fit(model, bundle, output=output, config=cfg, teacher=teacher_model, progress=progress,
               resume=resume, mode="train")  # fmt: skip


def finetune_file(
    model: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    data: str = "mnist-5k",
    data_root: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    config: TrainConfig | None = None,
    teacher: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    progress: TrainCallback | None = None,
    resume: bool = False,
    teacher_arch: str | None = None,
    teacher_arch_kwargs: Mapping[str, Any] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
) -> TrainResult:
    """Load a model file with :func:`ttcompress.checkpoint.io.load`, then :func:`finetune` it on ``data``.

    What ``ttcompress finetune`` runs. ``teacher`` is a model file for distillation (loaded the
    same way, with the same ``trust_pickle`` and ``trust_code``, by
    :func:`ttcompress.checkpoint.teacher.load_teacher`): a teacher that needs an architecture gets
    ``teacher_arch``/``teacher_arch_kwargs``, by default the student's recorded architecture.
    ``text:`` data is tokenized with ``tokenizer`` (default: the model's own, see
    :func:`ttcompress.data.text_tokenizer`) into sequences of ``seq_len`` tokens.
    """
    cfg = config or FinetuneConfig()
    check_not_inputs([output], [model, teacher])
    bundle = load_dataset(data, root=data_root, download=download, image_size=image_size,
                          tokenizer=text_tokenizer(data, tokenizer, model), seq_len=seq_len)  # fmt: skip
    net = _load_model(model, trust_pickle=trust_pickle, trust_code=trust_code, arch=arch, arch_kwargs=arch_kwargs)
    if teacher is None and (teacher_arch is not None or teacher_arch_kwargs is not None):
        raise UserInputError("teacher_arch and teacher_arch_kwargs need a teacher")
    teacher_model = None
    if teacher is not None:
        teacher_model = load_teacher(teacher, student=net, arch=teacher_arch, arch_kwargs=teacher_arch_kwargs,
                                     student_arch=arch, trust_pickle=trust_pickle, trust_code=trust_code)
    return fit(net, bundle, output=output, config=cfg, teacher=teacher_model, progress=progress,
               resume=resume, mode="finetune")  # fmt: skip


def _load_model(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    trust_code: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    kwargs: dict[str, Any] = {"trust_pickle": trust_pickle, "trust_code": trust_code}
    if arch is not None:
        kwargs["arch"] = arch
        kwargs["arch_kwargs"] = dict(arch_kwargs) if arch_kwargs else None  # none with a model file as arch
    return tio.load(path, **kwargs)
