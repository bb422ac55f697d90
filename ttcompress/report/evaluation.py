"""Evaluation and device resolution, shared by the training loop, reports and sweeps.

:func:`evaluate` measures top-1/top-5 accuracy and mean cross-entropy; :func:`resolve_device`
turns ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``. Nothing here imports the training loop,
so :mod:`ttcompress.report.compare` and :mod:`ttcompress.sweep` measure models without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ttcompress.modtree import eval_mode
from ttcompress.data import DatasetBundle, make_loader, sample_parts
from ttcompress.errors import UserInputError
from ttcompress.inputs import batch_size_of, call_model, input_mask, main_tensor, move_inputs
from ttcompress.outputs import primary_output

__all__ = [
    "EvalResult",
    "KL_CHUNK_ELEMENTS",
    "autocast",
    "distill_loss",
    "evaluate",
    "model_outputs",
    "next_token_labels",
    "objective_sums",
    "perplexity",
    "resolve_device",
    "resolve_device_type",
    "task_loss",
    "token_nll_sums",
]

#: The label of a position that no loss counts (padding), as in transformers.
IGNORE_INDEX = -100


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
    with eval_mode(model), torch.no_grad():
        for x, y in loader:
            x, y = move_inputs(x, device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = primary_output(call_model(model, x))
            logits = logits.float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += y.numel()
            sums[2] = logits.shape[1]
            kmax = min(max(topk), logits.shape[1])
            pred = logits.topk(kmax, dim=1).indices
            hit = pred.eq(y.unsqueeze(1))
            for i, k in enumerate(topk):
                sums[3 + i] += hit[:, : min(k, kmax)].any(dim=1).sum().double()
    return sums


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, kind: str, *, reduction: str = "mean") -> torch.Tensor:
    """The supervised loss: cross-entropy for ``kind == "class"``, the next-token cross-entropy for
    ``kind == "tokens"`` (see :func:`token_nll_sums`; each sample's loss is the mean over its
    counted positions), else mean squared error.

    For MSE the targets are cast to the outputs' dtype and must have their shape (a target of
    shape ``(N,)`` meets outputs of shape ``(N, 1)``). ``reduction="sum"`` sums the per-sample
    losses (each sample's MSE is a mean over its elements).
    """
    outputs = outputs.float()
    if kind == "class":
        return F.cross_entropy(outputs, targets, reduction=reduction)
    if kind == "tokens":
        nll, count = token_nll_sums(outputs, targets, per_sample=True)
        per_sample = nll / count.clamp(min=1)
        return per_sample.sum() if reduction == "sum" else per_sample.mean()
    t = targets.to(outputs.dtype)
    if t.shape != outputs.shape and t.numel() == outputs.numel():
        t = t.reshape(outputs.shape)
    if t.shape != outputs.shape:
        raise UserInputError(f"targets of shape {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}")
    per_sample = F.mse_loss(outputs, t, reduction="none").reshape(outputs.shape[0], -1).mean(dim=1)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def next_token_labels(inputs: Any) -> torch.Tensor:
    """The next-token labels of a language model's input batch: its ``input_ids`` (or the tensor
    itself), with :data:`IGNORE_INDEX` where the ``attention_mask`` is 0."""
    ids = main_tensor(inputs)
    mask = input_mask(inputs)
    return ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)


def token_nll_sums(
    logits: torch.Tensor, labels: torch.Tensor, *, per_sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of positions it counts.

    The standard shifted loss of a causal language model: the logits at position ``i`` predict
    the label at ``i + 1``, so the first position is never predicted, and a label equal to
    :data:`IGNORE_INDEX` (padding) is not counted. ``logits`` are ``(batch, positions, vocab)``,
    ``labels`` ``(batch, positions)`` int. Float64 sums over everything, or per sample
    (``per_sample=True``: two tensors of shape ``(batch,)``).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise UserInputError(f"next-token loss needs logits (batch, positions, vocab) and labels (batch, positions); "
                             f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    shifted, target = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(target.shape)  # fmt: skip
    counted = target != IGNORE_INDEX
    if per_sample:
        return nll.sum(dim=1), counted.sum(dim=1)
    return nll.double().sum(), counted.sum()


def perplexity(
    model: nn.Module,
    data: DatasetBundle | Dataset | DataLoader,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    amp: str | None = None,
) -> float:
    """Token-level perplexity of a causal language model: ``exp(total NLL / counted positions)``.

    The labels are the inputs' own ``input_ids`` with padding (``attention_mask`` 0) left out,
    shifted as in :func:`token_nll_sums`. A bundle is measured on its test (validation) split.

    Raises
    ------
    UserInputError
        The model does not return ``(batch, positions, vocab)`` logits, or no position is counted.
    """
    dev = resolve_device(device)
    src = _unwrap_loader_data(data)
    loader = src if isinstance(src, DataLoader) else make_loader(src, batch_size=batch_size, shuffle=False)
    model.to(dev)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            x = move_inputs(sample_parts(batch)[0], dev)
            with autocast(dev, amp):
                logits = primary_output(call_model(model, x))
            nll, n = token_nll_sums(logits, next_token_labels(x))
            total += nll.cpu()
            count += int(n)
    if count == 0:
        raise UserInputError("perplexity counts no position: every sequence has fewer than 2 unmasked tokens")
    return float(torch.exp(total / count))


#: Elements of the (positions, vocabulary) slice that :func:`distill_loss` holds at once per chunk.
KL_CHUNK_ELEMENTS = 1 << 22


def _kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` of each row of ``(rows, classes)`` logits."""
    dtype = torch.promote_types(s.dtype, torch.float32)  # half precision computed in float32
    log_s = F.log_softmax(s.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(t.to(dtype) / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1)


def _chunked_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`_kl_rows` over chunks of rows of :data:`KL_CHUNK_ELEMENTS`; with gradients, each
    chunk is recomputed in the backward pass (activation checkpointing), so the softmaxes of the
    whole ``(rows, classes)`` tensor are never held at once, in the forward or the backward."""
    rows = max(1, KL_CHUNK_ELEMENTS // max(1, s.shape[-1]))
    if s.shape[0] <= rows:
        return _kl_rows(s, t, temperature)
    grad = torch.is_grad_enabled() and s.requires_grad
    parts = []
    for start in range(0, s.shape[0], rows):
        sc, tc = s[start : start + rows], t[start : start + rows]
        if grad:
            parts.append(torch.utils.checkpoint.checkpoint(_kl_rows, sc, tc, temperature, use_reentrant=False))
        else:
            parts.append(_kl_rows(sc, tc, temperature))
    return torch.cat(parts)


def distill_loss(
    outputs: torch.Tensor, teacher_outputs: torch.Tensor, *, kind: str, temperature: float = 4.0,
    reduction: str = "mean", mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss of a student's outputs against a teacher's.

    ``kind="kl"``: ``T²·KL(softmax(t/T) || softmax(s/T))`` over the last dimension (Hinton,
    Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"), for class logits
    ``(batch, classes)``; for sequence logits ``(batch, positions, classes)`` (a language model's
    vocabulary, token classes) the per-position KL averaged over the positions of each sample
    that ``mask`` (``(batch, positions)``, 1 = counted, e.g. an ``attention_mask``) keeps -- every
    position without a mask. The KL is computed in chunks of positions
    (:data:`KL_CHUNK_ELEMENTS`), recomputed in the backward pass, so a second
    ``(batch, positions, vocabulary)`` tensor is never materialised.
    ``kind="mse"``: mean squared error between the outputs, for any output shape (regression,
    sequences, features); with a mask, over the kept positions only. ``reduction="sum"`` sums
    the per-sample losses.
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    batch = outputs.shape[0]
    if mask is not None and (outputs.dim() < 3 or tuple(mask.shape) != tuple(outputs.shape[:2])):
        mask = None  # a mask applies to positions: (batch, positions, ...) outputs only
    if kind == "kl":
        s, t = outputs.reshape(-1, outputs.shape[-1]), teacher_outputs.reshape(-1, teacher_outputs.shape[-1])
        per_position = _chunked_kl(s, t.detach(), temperature).view(batch, -1) * (temperature * temperature)
    else:
        diff = F.mse_loss(outputs.float(), teacher_outputs.float(), reduction="none")
        per_position = diff.reshape(batch, mask.shape[1], -1).mean(dim=2) if mask is not None else diff.reshape(batch, -1)
    if mask is None:
        per = per_position.mean(dim=1)
    else:
        weight = mask.to(per_position.dtype)
        per = (per_position * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
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
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            x, y = sample_parts(batch)
            x = move_inputs(x, device, non_blocking=True)
            with autocast(device, amp):
                out = primary_output(call_model(model, x))
                if teacher is not None:
                    t_out = primary_output(call_model(teacher, x), what="the teacher")
                    loss = distill_loss(out, t_out, kind=distill or "mse", temperature=temperature,
                                        reduction="sum", mask=input_mask(x))  # fmt: skip
                else:
                    loss = task_loss(out, y.to(device), targets, reduction="sum")
            sums[0] += loss.double()
            sums[1] += batch_size_of(x)
    return sums


def model_outputs(
    model: nn.Module, loader: Any, device: torch.device, amp: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's outputs over ``loader``, concatenated on the CPU, and the targets (None when absent)."""
    outs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            x, y = sample_parts(batch)
            with autocast(device, amp):
                outs.append(primary_output(call_model(model, move_inputs(x, device))).float().cpu())
            if y is not None:
                ys.append(torch.as_tensor(y))
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
