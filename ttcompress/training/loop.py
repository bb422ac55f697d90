"""The training loop: :func:`fit`, split into preparing a run, one epoch, validating, saving.

A call of :func:`fit` builds a :class:`_Run` (what stays fixed: model, loaders, optimizer, where it
runs) and a :class:`~ttcompress.training.checkpoint.RunState` (what accumulates: finished epochs,
the best so far), then runs one epoch at a time. See :mod:`ttcompress.training` for the files it
writes, determinism and distributed runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from ttcompress.modtree import eval_mode
from ttcompress.data import DatasetBundle, check_model_fits, make_loader, sample_parts
from ttcompress.checkpoint.dtypes import HALF_DTYPES, model_dtype
from ttcompress.errors import CheckpointError, TrainingError, UserInputError
from ttcompress.report.evaluation import (
    EvalResult, autocast, distill_loss, eval_sums, objective_sums, resolve_device_type, sums_to_result, task_loss,
)  # fmt: skip
from ttcompress.inputs import batch_size_of, call_model, input_mask, move_inputs
from ttcompress.outputs import is_logits_field, primary_output
import ttcompress.training.distributed as distributed
from ttcompress.training.checkpoint import (
    RunState,
    meta_snapshot,
    read_resume,
    restore,
    resume_payload,
    run_info,
    save_checkpoint,
    set_info,
    write_metrics,
    write_resume,
)
from ttcompress.training.config import STEP_SCHEDULES, TrainConfig, choice
from ttcompress.training.distributed import Dist
from ttcompress.training.optim import make_optimizer, make_scheduler, param_groups, set_trainable
from ttcompress.training.records import EpochRecord, RunPaths, TrainCallback, TrainResult, run_paths

__all__ = ["distill_kind", "fit", "holdout_split", "lone_last_batch"]


def _check_fit_types(model: Any, bundle: Any, config: Any, teacher: Any) -> None:
    """TypeError naming the first of :func:`fit`'s arguments that has the wrong type."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(bundle, DatasetBundle):
        raise TypeError(f"bundle must be a DatasetBundle, got {type(bundle).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")


def fit(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    output: str | os.PathLike[str],
    config: TrainConfig,
    teacher: nn.Module | None = None,
    progress: TrainCallback | None = None,
    resume: bool = False,
    mode: str = "finetune",
) -> TrainResult:
    """Train ``model`` in place on ``bundle.train``, validate after each epoch on a held-out part of it.

    Parameters
    ----------
    model : nn.Module
        Trained in place (its final weights are those of the last epoch; the best are in
        ``output``). Its ``ttcompress_meta`` is updated with the dataset info and the run.
    bundle : DatasetBundle
    output : path
        Best checkpoint; the other files go next to it (see :mod:`ttcompress.training`).
    config : TrainConfig
    teacher : nn.Module or None
        Knowledge distillation (Hinton et al. 2015) from this model's outputs (kept frozen in eval
        mode): KL on class logits or MSE on any output (``config.distill_loss``). Required when the
        data has no targets (``bundle.targets == "none"``): the run then trains and validates on
        the distillation loss alone, keeps the epoch of lowest validation loss, and records no
        accuracy (None).
    progress : TrainCallback or None
        Progress hooks, e.g. :class:`ttcompress.cli.progress.RichProgress` (rank 0 only).
    resume : bool, default False
        Continue from the resume state next to ``output``. Options that change the result must be
        those of the interrupted run (all but ``RESUME_FREE_OPTIONS``; ``epochs`` may change
        unless the schedule is cosine, which is stretched over them), and so must the dataset.
    mode : str, default "finetune"
        Recorded in the checkpoint's history ("train" or "finetune").

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Bad options, a model whose outputs do not match ``bundle.num_classes`` or that cannot take
        its inputs, ``train_only="decomposed"`` on a model without decomposed layers.
    TrainingError
        The loss became NaN/inf (the checkpoints of the last finished epoch are kept).
    CheckpointError
        ``resume`` without a readable resume state.

    Notes
    -----
    A ``model`` in float16 or bfloat16 is converted to float32 in place and trained (and saved)
    in float32: updates to half-precision weights without float32 master weights underflow or
    overflow (float16 reaches NaN within a few steps). ``config.amp`` gives mixed precision.
    """
    _check_fit_types(model, bundle, config, teacher)
    choice("mode", mode, ("train", "finetune"))
    if bundle.targets == "none" and teacher is None:
        raise UserInputError(
            f"data {bundle.name!r} has no targets: training on it needs a teacher to distill from"
        )
    paths = run_paths(output)
    if paths.best.exists() and paths.best.is_dir():
        raise IsADirectoryError(f"output is a directory: {paths.best}")

    # Cheap argument checks before touching the process group or the device.
    if config.amp is not None and resolve_device_type(config.device) != "cuda":
        raise UserInputError(f"amp={config.amp!r} needs a CUDA device (device={config.device!r} resolves elsewhere)")
    if resume and not paths.resume.is_file():
        left = [q.name for q in (paths.best, paths.last, paths.metrics) if q.exists()]
        raise CheckpointError(
            f"no resume state at {paths.resume} (a run stopped before its first epoch ended saves none): start "
            "over without --resume" + (f", with --overwrite to replace the files it left: {', '.join(left)}" if left else "")
        )
    resume_state = read_resume(paths.resume, config, bundle.name) if resume else None

    ctx, device = distributed.setup(config.device)
    try:
        cb = progress if (progress is not None and ctx.main) else TrainCallback()
        run, state = _prepare(model, bundle, paths=paths, config=config, teacher=teacher, cb=cb,
                              resume_state=resume_state, mode=mode, ctx=ctx, device=device)  # fmt: skip
        return _run_epochs(run, state)
    finally:
        distributed.teardown(ctx)


def holdout_split(bundle: DatasetBundle, *, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, validation)``: a random ``fraction`` of ``bundle.train`` held out.

    The split depends only on ``seed`` and the dataset size, not on the training seed, so it is
    the same in every process, run and resume, and a model fine-tuned from a baseline is
    validated on samples the baseline never trained on. With ``fraction == 0`` the validation
    set is ``bundle.test``.
    """
    if fraction == 0:
        return bundle.train, bundle.test
    n = len(bundle.train)  # type: ignore[arg-type]
    n_val = min(max(1, round(n * fraction)), n - 1)
    if n < 2:
        raise UserInputError(f"val_fraction={fraction} needs at least 2 training samples, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(bundle.train, sorted(order[n_val:])), Subset(bundle.train, sorted(order[:n_val]))


# -------------------------------------------------------------------------------------- setup


@dataclass
class _Run:
    """What stays fixed during one call of :func:`fit`."""

    model: nn.Module
    net: nn.Module  # ``model`` wrapped in DDP and/or compiled: what trains
    eval_net: nn.Module  # ``model`` (compiled when asked): what validates
    teacher: nn.Module | None
    bundle: DatasetBundle
    config: TrainConfig
    paths: RunPaths
    mode: str
    ctx: Dist
    device: torch.device
    cb: TrainCallback
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train_loader: DataLoader
    val_loader: DataLoader
    steps: int  # batches per epoch
    check_every: int  # NaN checks every this many steps
    distill: str | None  # "kl" or "mse" with a teacher, else None

    def info(self, state: RunState, epoch: int, accuracy: float | None) -> dict[str, Any]:
        """Checkpoint metadata after ``epoch``."""
        return run_info(state, mode=self.mode, bundle=self.bundle, config=self.config,
                        world_size=self.ctx.world_size, epoch=epoch, accuracy=accuracy)  # fmt: skip

    def result(self, state: RunState, *, interrupted: bool) -> TrainResult:
        return TrainResult(
            paths=self.paths,
            history=tuple(state.history),
            best_epoch=state.best_epoch,
            best_accuracy=state.best_accuracy,
            start_epoch=state.start_epoch,
            start=state.start,
            interrupted=interrupted,
            world_size=self.ctx.world_size,
            device=str(self.device),
            rank=self.ctx.rank,
        )


def _prepare(
    model: nn.Module,
    bundle: DatasetBundle,
    *,
    paths: RunPaths,
    config: TrainConfig,
    teacher: nn.Module | None,
    cb: TrainCallback,
    resume_state: dict[str, Any] | None,
    mode: str,
    ctx: Dist,
    device: torch.device,
) -> tuple[_Run, RunState]:
    """Check the models on the data, seed, build the optimizer, restore a resume state, build loaders."""
    if model_dtype(model) in HALF_DTYPES:  # float32 master weights: half-precision updates underflow
        model.float()
    model.to(device)
    check_model_fits(model, bundle, device=device)
    if teacher is not None:
        teacher.to(device).eval()  # its forward runs under no_grad; parameters are left as they are
        check_model_fits(teacher, bundle, device=device, what="teacher", require_finite=True)

    torch.manual_seed(config.seed)
    optimizer = make_optimizer(param_groups(model, set_trainable(model, config.train_only), config), config)
    train_loader, val_loader = _loaders(bundle, config, ctx, device)
    steps = len(train_loader) if config.max_batches is None else min(len(train_loader), config.max_batches)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=steps)
    scaler = torch.amp.GradScaler("cuda") if (config.amp == "fp16" and device.type == "cuda") else None
    state = RunState(base_meta=meta_snapshot(model))
    if resume_state is not None:
        state = restore(resume_state, path=paths.resume, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, device=device, base_meta=state.base_meta)  # fmt: skip

    net: nn.Module = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    eval_net: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]
    check_every = 1 if (device.type == "cpu" and not ctx.enabled) else config.log_every
    distill = distill_kind(model, teacher, bundle, choice=config.distill_loss, device=device) if teacher else None
    run = _Run(model=model, net=net, eval_net=eval_net, teacher=teacher, bundle=bundle, config=config, paths=paths,
               mode=mode, ctx=ctx, device=device, cb=cb, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
               train_loader=train_loader, val_loader=val_loader, steps=steps, check_every=check_every,
               distill=distill)  # fmt: skip
    return run, state


def distill_kind(
    model: nn.Module,
    teacher: nn.Module,
    bundle: DatasetBundle,
    *,
    choice: str = "auto",
    device: str | torch.device = "cpu",
) -> str:
    """The distillation loss to use, ``"kl"`` or ``"mse"``.

    ``choice`` ``"kl"``/``"mse"`` is taken as given (``"kl"`` needs class logits over the last
    dimension: ``(batch, classes)`` or ``(batch, positions, classes)``). ``"auto"`` picks ``"kl"``
    when the outputs are class logits: the ``logits`` field of a transformers ``ModelOutput`` (or
    of a dict), 2-D or 3-D (a language model's per-token vocabulary logits, a classifier's or
    token classifier's logits); or 2-D floating-point outputs of a plain model on a
    classification task, meaning the data has class labels or, without labels, the teacher's or
    the student's metadata records as many classes (``num_classes``) as there are outputs.
    ``"mse"`` otherwise (regression, hidden states, plain sequence outputs, any shape).
    """
    ds = bundle.test if len(bundle.test) else bundle.train  # type: ignore[arg-type]
    x = move_inputs(default_collate([sample_parts(ds[i])[0] for i in range(min(2, len(ds)))]), device)  # type: ignore[arg-type]
    with eval_mode(model), torch.no_grad():
        raw = call_model(model, x)
        out, t_out = primary_output(raw), primary_output(call_model(teacher, x), what="the teacher")
    if t_out.shape != out.shape:
        raise UserInputError(f"the teacher's outputs {tuple(t_out.shape)} and the model's {tuple(out.shape)} differ "
                             "in shape: it cannot be distilled from")
    classes = out.is_floating_point() and out.dim() in (2, 3) and out.shape[-1] >= 2
    if choice == "kl" and not classes:
        raise UserInputError("distill_loss='kl' needs class logits over the last dimension, (batch, classes) or "
                             f"(batch, positions, classes), got outputs {tuple(out.shape)}")
    if choice != "auto":
        return choice
    if classes and is_logits_field(raw):
        return "kl"
    if not (classes and out.dim() == 2):
        return "mse"
    if bundle.has_labels:
        return "kl"
    recorded = {_num_classes(m) for m in (model, teacher)}
    return "kl" if out.shape[1] in recorded else "mse"


def _num_classes(model: nn.Module) -> int | None:
    n = meta_snapshot(model).get("num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _loaders(bundle: DatasetBundle, config: TrainConfig, ctx: Dist, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Shuffled (and, under DDP, sharded) training loader; validation loader over this rank's shard."""
    train_set, val_set = holdout_split(bundle, fraction=config.val_fraction)
    train_loader = make_loader(
        train_set, batch_size=config.batch_size, shuffle=True, seed=config.seed, num_workers=config.num_workers,
        distributed=ctx.enabled, pin_memory=device.type == "cuda",
        drop_last=lone_last_batch(len(train_set), batch_size=config.batch_size, world_size=ctx.world_size),  # type: ignore[arg-type]
    )  # fmt: skip
    val_loader = make_loader(
        distributed.shard(val_set, ctx), batch_size=config.eval_batch_size, shuffle=False,
        num_workers=config.num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    return train_loader, val_loader


def lone_last_batch(n: int, *, batch_size: int, world_size: int = 1) -> bool:
    """Whether each process's last training batch would hold a single sample (then it is dropped).

    BatchNorm cannot train on a batch of one (its batch variance is undefined), and a one-sample
    step is mostly noise anyway. Under ``torchrun`` each process would get ``ceil(n / world_size)``
    samples (``DistributedSampler`` pads); when that leaves a lone sample, ``drop_last`` also makes
    the sampler drop the uneven tail, so every process drops its last partial batch. A dataset of
    one batch in all is kept whole.
    """
    per_process = -(-n // world_size)
    return per_process > batch_size and per_process % batch_size == 1


# ------------------------------------------------------------------------------------- epochs


def _run_epochs(run: _Run, state: RunState) -> TrainResult:
    """Every remaining epoch; on Ctrl-C save the last weights and return an interrupted result."""
    run.cb.on_train_start(epochs=run.config.epochs, start_epoch=state.start_epoch, steps_per_epoch=run.steps,
                          device=str(run.device), world_size=run.ctx.world_size)  # fmt: skip
    interrupted = False
    epoch = state.start_epoch
    try:
        if run.mode == "finetune" and state.start_epoch == 0 and state.start is None:
            _validate_start(run, state)
        for epoch in range(state.start_epoch + 1, run.config.epochs + 1):
            _one_epoch(run, state, epoch)
    except KeyboardInterrupt:
        interrupted = True
        if run.ctx.main and state.history:  # before the first epoch ends there is no resume state: save nothing
            with contextlib.suppress(KeyboardInterrupt):
                info = {**run.info(state, epoch, state.history[-1].val_accuracy), "interrupted_in_epoch": epoch}
                save_checkpoint(run.model, run.paths.last, info)
    except BaseException:
        run.cb.on_train_end(run.result(state, interrupted=False))
        raise

    # Leave the model's metadata describing the finished run (as saved in the last checkpoint).
    if state.history:
        set_info(run.model, run.info(state, state.history[-1].epoch, state.history[-1].val_accuracy))
    result = run.result(state, interrupted=interrupted)
    run.cb.on_train_end(result)
    return result


def _one_epoch(run: _Run, state: RunState, epoch: int) -> None:
    """Train, step the schedule, validate, record, save (rank 0), then wait for every process."""
    sampler = run.train_loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    run.cb.on_epoch_start(epoch=epoch, steps=run.steps)
    totals, seconds = _train_epoch(run, state, epoch)
    lr_now = run.optimizer.param_groups[0]["lr"]
    if run.scheduler is not None and run.config.schedule not in STEP_SCHEDULES:
        run.scheduler.step()
    val = _validate(run, state, epoch)
    record = _record(state, epoch, totals=totals, seconds=seconds, val=val, lr=float(lr_now))
    if run.ctx.main:
        _save(run, state, epoch, val.accuracy, improved=record.best)
    distributed.barrier(run.ctx)
    run.cb.on_epoch_end(record)


def _validate_start(run: _Run, state: RunState) -> None:
    """Fine-tuning only: score the model it starts from as epoch 0, and save it as the best so far.

    An epoch then has to beat the starting model on the validation split to replace it, so
    fine-tuning never hands back a model that validates worse than the one it was given.
    """
    start = time.perf_counter()
    val = _validate(run, state, 0)
    state.best_accuracy, state.best_loss, state.best_epoch = val.accuracy, val.loss, 0
    state.start = EpochRecord(epoch=0, train_loss=math.nan, train_accuracy=None, val_loss=val.loss,
                              val_accuracy=val.accuracy, val_top5=val.top5, lr=0.0,
                              seconds=time.perf_counter() - start, samples_per_s=0.0, best=True)  # fmt: skip
    if run.ctx.main:
        save_checkpoint(run.model, run.paths.best, run.info(state, 0, val.accuracy))
    distributed.barrier(run.ctx)


def _train_epoch(run: _Run, state: RunState, epoch: int) -> tuple[torch.Tensor, float]:
    """One pass over the training batches: (loss sum, correct, samples) over all processes, seconds."""
    run.net.train()
    t0 = time.perf_counter()
    run_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    run_correct = torch.zeros((), dtype=torch.float64, device=run.device)
    seen = 0
    labels = run.bundle.has_labels
    for step, batch in enumerate(run.train_loader, start=1):
        if step > run.steps:
            break
        x, y = sample_parts(batch)
        x = move_inputs(x, run.device, non_blocking=True)
        y = y.to(run.device, non_blocking=True) if y is not None else None
        loss, logits = _train_step(run, x, y, epoch=epoch, step=step)
        n_batch = batch_size_of(x)
        seen += n_batch
        run_loss += loss.detach().double() * n_batch
        if labels:
            run_correct += (logits.detach().argmax(dim=1) == y).sum().double()
        if step % run.check_every == 0 or step == run.steps:
            _raise_if_nan(run_loss, run, state, epoch, step)
        if run.ctx.main and (step % run.config.log_every == 0 or step == run.steps):
            elapsed = max(time.perf_counter() - t0, 1e-9)
            run.cb.on_step(epoch=epoch, step=step, loss=run_loss.item() / seen,
                           accuracy=run_correct.item() / seen if labels else None,
                           samples_per_s=seen * run.ctx.world_size / elapsed)  # fmt: skip
    seconds = time.perf_counter() - t0
    n = torch.tensor(float(seen), dtype=torch.float64, device=run.device)
    totals = distributed.all_reduce(torch.stack([run_loss, run_correct, n]), run.ctx)
    _raise_if_nan(totals[0], run, state, epoch, run.steps, reduce=False)
    return totals, seconds


def _train_step(
    run: _Run, x: Any, y: torch.Tensor | None, *, epoch: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss (with distillation when there is a teacher), backward and optimizer step.

    The loss is the task's (cross-entropy on class labels, MSE on other targets), mixed with the
    distillation term as ``alpha·distill + (1-alpha)·task``; without targets it is the
    distillation term alone.
    """
    config = run.config
    with autocast(run.device, config.amp):
        logits = primary_output(call_model(run.net, x))
        loss = task_loss(logits, y, run.bundle.targets) if y is not None else None
        if run.teacher is not None and run.distill is not None:
            with torch.no_grad():
                t_logits = primary_output(call_model(run.teacher, x), what="the teacher").float()
            if step % run.check_every == 0 or step == run.steps:
                _raise_if_teacher_nan(t_logits, run.ctx, epoch, step)
            kd = distill_loss(logits, t_logits, kind=run.distill, temperature=config.distill_temperature,
                              mask=input_mask(x))  # fmt: skip
            loss = kd if loss is None else config.distill_alpha * kd + (1.0 - config.distill_alpha) * loss
        if loss is None:  # fit() refuses data without targets and without a teacher
            raise TrainingError("no loss: the data has no targets and there is no teacher")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    if run.scheduler is not None and run.config.schedule in STEP_SCHEDULES:
        run.scheduler.step()
    return loss, logits


def _validate(run: _Run, state: RunState, epoch: int) -> EvalResult:
    """Accuracy on the validation split, summed over the processes' shards.

    Without class labels: the training objective (MSE on the targets, or the distillation loss
    when there are none) and no accuracy.
    """
    if not run.bundle.has_labels:
        teacher = run.teacher if run.bundle.targets == "none" else None
        sums = objective_sums(run.eval_net, run.val_loader, run.device, run.config.amp, targets=run.bundle.targets,
                              teacher=teacher, distill=run.distill, temperature=run.config.distill_temperature)  # fmt: skip
        sums = distributed.all_reduce(sums, run.ctx)
        n = int(sums[1].item())
        val = EvalResult(accuracy=None, top5=None, loss=float(sums[0]) / n if n else float("nan"), n=n)
        if not math.isfinite(val.loss):
            _raise_if_nan(torch.tensor(val.loss), run, state, epoch, run.steps, reduce=False, what="validation loss")
        return val
    n_classes = run.bundle.num_classes
    topk = (1, 5) if n_classes > 5 else (1,)
    sums = distributed.all_reduce(eval_sums(run.eval_net, run.val_loader, run.device, topk, run.config.amp), run.ctx)
    sums[2] = n_classes  # summed over ranks above
    val = sums_to_result(sums, topk)
    if not math.isfinite(val.loss):  # NaN/inf outputs: never kept, never "best"
        _raise_if_nan(torch.tensor(val.loss), run, state, epoch, run.steps, reduce=False, what="validation loss")
    return val


def _record(state: RunState, epoch: int, *, totals: torch.Tensor, seconds: float, val: EvalResult, lr: float) -> EpochRecord:
    """Append the epoch's record to the history, updating the best accuracy; return it."""
    n_seen = max(float(totals[2]), 1.0)
    if val.accuracy is None:  # no accuracy (data without class labels): the lowest validation loss wins
        improved = state.best_loss is None or val.loss < state.best_loss
    else:
        improved = state.best_accuracy is None or val.accuracy > state.best_accuracy
    if improved:
        state.best_accuracy, state.best_loss, state.best_epoch = val.accuracy, val.loss, epoch
    record = EpochRecord(
        epoch=epoch,
        train_loss=float(totals[0]) / n_seen,
        train_accuracy=float(totals[1]) / n_seen if val.accuracy is not None else None,
        val_loss=val.loss,
        val_accuracy=val.accuracy,
        val_top5=val.top5,
        lr=lr,
        seconds=seconds,
        samples_per_s=n_seen / max(seconds, 1e-9),
        best=improved,
    )
    state.history.append(record)
    return record


def _save(run: _Run, state: RunState, epoch: int, accuracy: float, *, improved: bool) -> None:
    """Best (when improved) and last checkpoints, the metrics log and the resume state."""
    if improved:
        save_checkpoint(run.model, run.paths.best, run.info(state, epoch, accuracy))
    save_checkpoint(run.model, run.paths.last, run.info(state, epoch, accuracy))
    write_metrics(run.paths.metrics, state.history, run.mode)
    payload = resume_payload(state, epoch=epoch, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                             scaler=run.scaler, config=run.config, data=run.bundle.name)  # fmt: skip
    write_resume(run.paths.resume, payload)


# ------------------------------------------------------------------------------------- checks


def _raise_if_nan(
    value: torch.Tensor,
    run: _Run,
    state: RunState,
    epoch: int,
    step: int,
    *,
    reduce: bool = True,
    what: str = "loss",
) -> None:
    bad = (~torch.isfinite(value)).to(torch.float32).reshape(1)
    if reduce:
        bad = distributed.all_reduce(bad, run.ctx, op="max")
    if bool(bad.item()):
        paths = run.paths
        kept = (
            f"kept the checkpoints of epoch {state.best_epoch} ({paths.best.name}) and of the last finished epoch "
            f"({paths.last.name})"
            if state.best_epoch is not None
            else "no checkpoint was written"
        )
        where = f"at step {step}" if what == "loss" else "after training"
        raise TrainingError(
            f"{what} became NaN/inf in epoch {epoch} {where}; stopped and {kept}. Try a lower learning rate"
        )


def _raise_if_teacher_nan(logits: torch.Tensor, ctx: Dist, epoch: int, step: int) -> None:
    bad = (~torch.isfinite(logits).all()).to(torch.float32).reshape(1)
    if bool(distributed.all_reduce(bad, ctx, op="max").item()):
        raise TrainingError(
            f"the teacher's outputs are NaN/inf in epoch {epoch} at step {step}: the teacher model is broken "
            "(this is not a learning-rate problem)"
        )
