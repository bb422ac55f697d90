"""What a run writes and how it resumes: checkpoints, the metrics log, the resume state, RNG state.

The resume state (``name.resume.pt``) holds tensors and plain containers only, so it is read with
``torch.load(weights_only=True)``. :func:`read_resume` refuses a state whose result-changing options
(all but :data:`RESUME_FREE_OPTIONS`) or dataset differ from the run being resumed.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ttcompress.data import DatasetBundle
from ttcompress.errors import CheckpointError, UserInputError
from ttcompress.checkpoint.io import atomic_write, save, update_meta
from ttcompress.checkpoint.meta import read_meta
from ttcompress.training.config import TrainConfig
from ttcompress.training.records import EpochRecord

__all__ = [
    "RESUME_FORMAT",
    "RESUME_FREE_OPTIONS",
    "RunState",
    "meta_snapshot",
    "read_resume",
    "restore",
    "resume_payload",
    "rng_state",
    "run_info",
    "save_checkpoint",
    "set_info",
    "set_rng_state",
    "write_metrics",
    "write_resume",
]

RESUME_FORMAT = "ttcompress-resume"
#: Options that do not change a run's result: they may differ between a run and its resumption.
RESUME_FREE_OPTIONS: frozenset[str] = frozenset({"device", "num_workers", "log_every", "eval_batch_size", "compile"})


@dataclass
class RunState:
    """What a run has accumulated: finished epochs and the best so far; saved in the resume state.

    ``base_meta`` is the model's metadata ``info`` before the run, to which the run's history entry
    is appended in every checkpoint.
    """

    base_meta: dict[str, Any]
    start_epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_accuracy: float | None = None
    best_epoch: int | None = None
    best_loss: float | None = None  # validation loss of the best epoch (what ranks runs without accuracy)
    start: EpochRecord | None = None  # fine-tuning: the starting model scored as epoch 0


# --------------------------------------------------------------------------------- read/check


def read_resume(path: Path, config: TrainConfig, data: str | None = None) -> dict[str, Any]:
    """Load the resume state at ``path`` and check it was written by a run with the same options.

    Raises
    ------
    CheckpointError
        No state, an unreadable one, or not a ttcompress resume state.
    UserInputError
        Options that change the result (or the dataset ``data``) differ from the interrupted run.
    """
    if not path.is_file():
        raise CheckpointError(f"no resume state at {path} (run without --resume to start over)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read resume state {path}: {' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path} is not a ttcompress resume state")
    old = state.get("config") or {}
    now = config.to_dict()
    # More (or fewer) epochs only change the result when the schedule is stretched over them.
    free = RESUME_FREE_OPTIONS | ({"epochs"} if config.schedule in ("none", "step") else set())
    changed = [
        f"{key} {old[key]!r} -> {now[key]!r}" for key in now if key not in free and key in old and old[key] != now[key]
    ]
    if state.get("data") is not None and data is not None and state["data"] != data:
        changed.append(f"data {state['data']!r} -> {data!r}")
    if changed:
        raise UserInputError(
            f"cannot resume {path}: options that change the result differ from the interrupted run: "
            f"{', '.join(changed)} (use the same options, or start over without resume)"
        )
    return state


def restore(
    resume_state: Mapping[str, Any],
    *,
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    device: torch.device,
    base_meta: dict[str, Any],
) -> RunState:
    """Load a resume state into the run's objects and the global RNG; the :class:`RunState` it holds."""
    try:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None and resume_state.get("scheduler") is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler") is not None:
            scaler.load_state_dict(resume_state["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"resume state {path} does not fit this model/run: {' '.join(str(exc).split())[:300]}") from exc
    model.to(device)
    if resume_state.get("base_meta_info") is not None:
        base_meta = json.loads(resume_state["base_meta_info"])
    state = RunState(
        base_meta=base_meta,
        start_epoch=int(resume_state["epoch"]),
        history=[EpochRecord(**r) for r in resume_state.get("history", [])],
        best_accuracy=resume_state.get("best_accuracy"),
        best_epoch=resume_state.get("best_epoch"),
        best_loss=resume_state.get("best_loss"),
        start=EpochRecord(**resume_state["start"]) if isinstance(resume_state.get("start"), dict) else None,
    )
    set_rng_state(resume_state.get("rng", {}))
    return state


# ------------------------------------------------------------------------------------- write


def resume_payload(
    state: RunState,
    *,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    config: TrainConfig,
    data: str,
) -> dict[str, Any]:
    """The resume state after ``epoch``: everything :func:`restore` needs, tensors and containers only."""
    return {
        "format": RESUME_FORMAT,
        "version": 1,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "best_accuracy": state.best_accuracy,
        "best_epoch": state.best_epoch,
        "best_loss": state.best_loss,
        "history": [r.to_dict() for r in state.history],
        "start": state.start.to_dict() if state.start is not None else None,
        "config": config.to_dict(),
        "data": data,
        "base_meta_info": json.dumps(state.base_meta),
    }


def write_resume(path: Path, payload: dict[str, Any]) -> None:
    """Write a resume state atomically."""
    with atomic_write(path, mode="wb") as f:
        torch.save(payload, f)


def save_checkpoint(model: nn.Module, path: Path, info: Mapping[str, Any]) -> None:
    """A ttcompress checkpoint of ``model`` with metadata ``info`` (:func:`ttcompress.checkpoint.io.save`)."""
    save(model, path, info=dict(info))


def write_metrics(path: Path, history: Sequence[EpochRecord], mode: str) -> None:
    """The metrics log: one JSON object per finished epoch, atomically rewritten."""
    with atomic_write(path, mode="w") as f:
        for r in history:
            f.write(json.dumps({"mode": mode, **r.to_dict()}) + "\n")


# ---------------------------------------------------------------------------------- metadata


def meta_snapshot(model: nn.Module) -> dict[str, Any]:
    """A JSON-safe copy of the model's metadata ``info`` (empty when it has none)."""
    return json.loads(json.dumps(read_meta(model).info, default=str))


def set_info(model: nn.Module, info: Mapping[str, Any]) -> None:
    """Replace the model's metadata ``info``."""
    update_meta(model, info=dict(info))


def run_info(
    state: RunState,
    *,
    mode: str,
    bundle: DatasetBundle,
    config: TrainConfig,
    world_size: int,
    epoch: int,
    accuracy: float | None,
) -> dict[str, Any]:
    """Checkpoint metadata ``info``: the dataset's info and the history with this run appended."""
    entry = {
        "op": mode,
        "dataset": bundle.name,
        "epochs": epoch,
        "accuracy": accuracy,
        "best_epoch": state.best_epoch,
        "config": config.to_dict(),
        "world_size": world_size,
        "metrics": [r.to_dict() for r in state.history],
    }
    return {**bundle.info(), "history": [*state.base_meta.get("history", []), entry]}


# --------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The global torch (and, once initialized, CUDA) RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA is available)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])
