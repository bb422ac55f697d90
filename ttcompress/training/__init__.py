"""Training, fine-tuning and evaluation: one loop, CPU/GPU, single process or ``torchrun`` DDP.

:func:`train` fits a dense baseline from scratch, :func:`finetune` recovers the accuracy of a
compressed model; both run :func:`fit`. The loop supports SGD with momentum, Adam, AdamW and
Adadelta (the optimizers compared in the TT thesis [1]_), cosine or step learning-rate schedules,
mixed precision on CUDA (bf16, or fp16 with a ``GradScaler``), ``torch.compile``, knowledge
distillation from a teacher [2]_, and training only the decomposed layers.

Where things live:

- :mod:`~ttcompress.training.config`: :class:`TrainConfig`, :class:`FinetuneConfig` and their checks;
- :mod:`~ttcompress.training.loop`: :func:`fit` (prepare, one epoch, validate, save) and :func:`holdout_split`;
- :mod:`~ttcompress.training.checkpoint`: checkpoints, metrics log, resume state, RNG state;
- :mod:`~ttcompress.training.optim`: trainable parameters, optimizer, schedule;
- :mod:`~ttcompress.training.distributed`: ``torchrun`` process group, reductions, sharding;
- :mod:`~ttcompress.training.records`: :class:`EpochRecord`, :class:`TrainResult`, :class:`RunPaths`,
  the :class:`TrainCallback` progress protocol;
- :mod:`~ttcompress.training.api`: :func:`train`, :func:`finetune`, :func:`train_arch`, :func:`finetune_file`;
- :mod:`ttcompress.report.evaluation` (outside this package, so reports need no training loop):
  :func:`~ttcompress.report.evaluation.evaluate` and :func:`~ttcompress.report.evaluation.resolve_device`.

Files written next to ``output`` (``OUT = dir/name.ext``), each atomically and on rank 0 only:

``OUT``
    The best checkpoint by validation top-1 accuracy (on a seeded 10 % of the training split held
    out, see ``TrainConfig.val_fraction``; the test split is not used), a ttcompress checkpoint
    written with :func:`ttcompress.checkpoint.io.save`.
``dir/name.last.ext``
    The checkpoint after the last finished epoch (or at the moment of a Ctrl-C).
``dir/name.resume.pt``
    Resume state after each finished epoch: model, optimizer, scheduler, grad scaler, RNG
    states, history; tensors and plain containers only (``torch.load(weights_only=True)``).
``dir/name.metrics.jsonl``
    One JSON object per finished epoch (see :class:`EpochRecord`).

Determinism: the data order depends only on ``(seed, epoch)`` and the global RNG is seeded
with ``seed`` (and restored on resume), so on CPU two runs with the same seed give identical
weights and a resumed run equals an uninterrupted one.

Distributed: when ``WORLD_SIZE > 1`` (set by ``torchrun``) the loop initializes the process
group (NCCL on CUDA, gloo on CPU) unless it already is, uses ``cuda:LOCAL_RANK``, wraps the model
in ``DistributedDataParallel``, shards train and test data, and destroys the group at the end
if it created it. ``batch_size`` is per process.

References
----------
.. [1] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks",
   NeurIPS 2015.
.. [2] G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
   arXiv:1503.02531, 2015.
"""

from __future__ import annotations

from ttcompress.training.api import finetune, finetune_file, fit_arch_kwargs, train, train_arch
from ttcompress.training.checkpoint import RESUME_FREE_OPTIONS
from ttcompress.training.config import AMP_MODES, OPTIMIZERS, SCHEDULES, FinetuneConfig, TrainConfig
from ttcompress.training.loop import fit, holdout_split
from ttcompress.training.records import EpochRecord, RunPaths, TrainCallback, TrainResult, run_paths

__all__ = [
    "AMP_MODES",
    "OPTIMIZERS",
    "RESUME_FREE_OPTIONS",
    "SCHEDULES",
    "EpochRecord",
    "FinetuneConfig",
    "RunPaths",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "finetune",
    "finetune_file",
    "fit",
    "fit_arch_kwargs",
    "holdout_split",
    "run_paths",
    "train",
    "train_arch",
]
