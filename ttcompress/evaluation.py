"""Evaluation and device resolution, shared by the training loop, reports and sweeps.

:func:`evaluate` measures top-1/top-5 accuracy and mean cross-entropy; :func:`resolve_device`
turns ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``. Nothing here imports the training loop,
so :mod:`ttcompress.report` and :mod:`ttcompress.sweep` measure models without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ttcompress.data import DatasetBundle, make_loader, sample_parts
from ttcompress.errors import UserInputError
from ttcompress.outputs import primary_output

__all__ = [
    "EvalResult",
    "autocast",
    "distill_loss",
    "evaluate",
    "model_outputs",
    "objective_sums",
    "resolve_device",
    "resolve_device_type",
    "task_loss",
]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a model on a dataset.

    Attributes
    ----------
    accuracy : float or None
        Top-1, fraction 0..1; None where accuracy is not defined (data without class labels).
    top5 : float or None
        Top-5 fraction when asked for and the model has more than 5 outputs.
    loss : float
        Mean cross-entropy (with class labels); else the mean objective (MSE on the targets, or
        the distillation loss against a teacher).
    n : int
        Number of samples.
    """

    accuracy: float | None
    top5: float | None
    loss: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``.

    ``auto`` picks CUDA when available, otherwise the CPU.

    Raises
    ------
    ValueError
        Unknown spelling, or a device that is not available here.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, got {type(device).__name__}")
    spec = device.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserInputError("device 'mps' requested but MPS is not available")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2]
        if index and not index.isdigit():
            raise UserInputError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
        if not torch.cuda.is_available():
            raise UserInputError(f"device {device!r} requested but CUDA is not available (use --device auto or cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise UserInputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(spec)
    raise UserInputError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")


def resolve_device_type(device: str) -> str:
    """Device type (``"cpu"``, ``"cuda"``, ``"mps"``) that ``device`` resolves to here."""
    return resolve_device(device).type


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to bf16 or fp16 on ``device``; a no-op context when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------ evaluate


def _unwrap_loader_data(data: Any) -> Dataset | DataLoader:
    if isinstance(data, DatasetBundle):
        return data.test
    if isinstance(data, (Dataset, DataLoader)):
        return data
    raise TypeError(f"data must be a DatasetBundle, Dataset or DataLoader, got {type(data).__name__}")


def eval_sums(model: nn.Module, loader: Any, device: torch.device, topk: Sequence[int], amp: str | None) -> torch.Tensor:
    """(loss sum, n, number of outputs, correct@k for each k) as a float64 tensor on ``device``.

    Sums rather than means, so that the shards of a distributed evaluation add up exactly.
    """
    sums = torch.zeros(3 + len(topk), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, amp):
                    logits = primary_output(model(x))
                logits = logits.float()
                sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
                sums[1] += y.numel()
                sums[2] = logits.shape[1]
                kmax = min(max(topk), logits.shape[1])
                pred = logits.topk(kmax, dim=1).indices
                hit = pred.eq(y.unsqueeze(1))
                for i, k in enumerate(topk):
                    sums[3 + i] += hit[:, : min(k, kmax)].any(dim=1).sum().double()
    finally:
        model.train(was_training)
    return sums


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, kind: str, *, reduction: str = "mean") -> torch.Tensor:
    """The supervised loss: cross-entropy for ``kind == "class"``, else mean squared error.

    For MSE the targets are cast to the outputs' dtype and must have their shape (a target of
    shape ``(N,)`` meets outputs of shape ``(N, 1)``). ``reduction="sum"`` sums the per-sample
    losses (each sample's MSE is a mean over its elements).
    """
    outputs = outputs.float()
    if kind == "class":
        return F.cross_entropy(outputs, targets, reduction=reduction)
    t = targets.to(outputs.dtype)
    if t.shape != outputs.shape and t.numel() == outputs.numel():
        t = t.reshape(outputs.shape)
    if t.shape != outputs.shape:
        raise UserInputError(f"targets of shape {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}")
    per_sample = F.mse_loss(outputs, t, reduction="none").reshape(outputs.shape[0], -1).mean(dim=1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def distill_loss(
    outputs: torch.Tensor, teacher_outputs: torch.Tensor, *, kind: str, temperature: float = 4.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distillation loss of a student's outputs against a teacher's.

    ``kind="kl"``: ``T²·KL(softmax(t/T) || softmax(s/T))`` over the last dimension (Hinton,
    Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"), for class logits
    ``(batch, classes)``; for sequence logits ``(batch, positions, classes)`` (a language model's
    vocabulary, token classes) the per-position KL averaged over the positions of each sample.
    ``kind="mse"``: mean squared error between the outputs, for any output shape (regression,
    sequences, features). ``reduction="sum"`` sums the per-sample losses.
    """
    s, t = outputs.float(), teacher_outputs.float()
    if kind == "kl":
        kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                      reduction="none", log_target=True).sum(dim=-1)  # fmt: skip
        per = kl.reshape(s.shape[0], -1).mean(dim=1) * (temperature * temperature)
    elif kind == "mse":
        per = F.mse_loss(s, t, reduction="none").reshape(s.shape[0], -1).mean(dim=1)
    else:
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    return per.sum() if reduction == "sum" else per.mean()


def objective_sums(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp: str | None,
    *,
    targets: str,
    teacher: nn.Module | None = None,
    distill: str | None = None,
    temperature: float = 4.0,
) -> torch.Tensor:
    """(loss sum, n) as float64 on ``device``: distillation loss against ``teacher`` when given,
    else the task loss on the batches' targets (see :func:`task_loss`)."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = sample_parts(batch)
                x = x.to(device, non_blocking=True)
                with autocast(device, amp):
                    out = primary_output(model(x))
                    if teacher is not None:
                        t_out = primary_output(teacher(x), what="the teacher")
                        loss = distill_loss(out, t_out, kind=distill or "mse", temperature=temperature, reduction="sum")
                    else:
                        loss = task_loss(out, y.to(device), targets, reduction="sum")
                sums[0] += loss.double()
                sums[1] += x.shape[0]
    finally:
        model.train(was_training)
    return sums


def model_outputs(
    model: nn.Module, loader: Any, device: torch.device, amp: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's outputs over ``loader``, concatenated on the CPU, and the targets (None when absent)."""
    outs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = sample_parts(batch)
                with autocast(device, amp):
                    outs.append(primary_output(model(x.to(device))).float().cpu())
                if y is not None:
                    ys.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    return torch.cat(outs), (torch.cat(ys) if ys and len(ys) == len(outs) else None)


def sums_to_result(sums: torch.Tensor, topk: Sequence[int]) -> EvalResult:
    """The :class:`EvalResult` of the sums from :func:`eval_sums` (NaN accuracy when ``n == 0``)."""
    values = sums.tolist()
    n = int(values[1])
    if n == 0:
        return EvalResult(accuracy=float("nan"), top5=None, loss=float("nan"), n=0)
    n_outputs = int(values[2])
    acc = {k: values[3 + i] / n for i, k in enumerate(topk)}
    top1 = acc.get(1, values[3] / n)
    top5 = acc[5] if 5 in acc and n_outputs > 5 else None
    return EvalResult(accuracy=top1, top5=top5, loss=values[0] / n, n=n)


def evaluate(
    model: nn.Module,
    data: DatasetBundle | Dataset | DataLoader,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    topk: Sequence[int] = (1, 5),
    amp: str | None = None,
) -> EvalResult:
    """Top-1 (and top-5) accuracy and mean cross-entropy, in eval mode under ``no_grad``.

    Parameters
    ----------
    model : nn.Module
        Moved to ``device``; its train/eval mode is restored afterwards.
    data : DatasetBundle, Dataset or DataLoader
        A bundle is evaluated on its test split.
    device : str or torch.device, default "cpu"
        As :func:`resolve_device`.
    batch_size : int, default 256
        Ignored when ``data`` is a DataLoader.
    topk : sequence of int, default (1, 5)
        ``top5`` is reported when 5 is in ``topk`` and the model has more than 5 outputs.
    amp : {"bf16", "fp16"} or None
        Autocast dtype (CUDA).
    """
    if not topk or any(not isinstance(k, int) or k < 1 for k in topk):
        raise UserInputError(f"topk must be positive ints, got {topk!r}")
    dev = resolve_device(device)
    src = _unwrap_loader_data(data)
    loader = src if isinstance(src, DataLoader) else make_loader(src, batch_size=batch_size, shuffle=False)
    model.to(dev)
    sums = eval_sums(model, loader, dev, tuple(topk), amp)
    return sums_to_result(sums, tuple(topk))
