"""Compress a sharded Hugging Face decoder one transformer block at a time (larger than memory).

A model stored as ``model.safetensors.index.json`` plus shards need not fit in memory to be
compressed. :func:`compress_sharded` never builds the whole model: it checks every shape in the
shards' headers against a skeleton built on the ``meta`` device, loads the layers outside the
blocks (embeddings, final norm, output layer), then for each decoder block in turn

1. reads the block's tensors from the shards (one shard open at a time),
2. with calibration data: runs the dense block on the dense model's hidden states and keeps its
   outputs for the next block, then compresses the block with
   :func:`~ttcompress.compression.pipeline.compress_with_report`, calibrated exactly as the whole
   model would be (each layer fitted on the inputs the already-compressed model gives it, against
   the dense model's: both streams of hidden states are carried from block to block, with the
   block's attention mask and rotary embeddings), and runs the compressed block on the compressed
   stream;
3. writes the block's tensors as one shard of the output and frees the block.

The output layer is compressed last, on the final hidden states. Peak memory is the layers
outside the blocks, one block (three copies while it is calibrated: dense, the calibration copy,
the new layers) and the calibration activations (two streams of ``samples x tokens x hidden``),
not the whole model. The written directory is sharded the same way (one shard per block, one for
the rest, and ``model.safetensors.index.ttcompress.json``), with the same ``config.json``,
``ttcompress.json`` and ``modeling_ttcompress.py`` as :func:`ttcompress.checkpoint.hf.save_hf_dir`
writes, so it loads with :func:`ttcompress.load` (and transformers' ``trust_remote_code`` route).

The layers keep their whole-model names (``model.layers.3.mlp.up_proj``), so a plan's patterns
select what they select in the whole model, and fixed-rank plans give the layers the whole-model
compression gives, data-free or calibrated (identical outputs in tests/test_blockwise.py; the
same computations in the same order). A ``target_ratio`` plan without calibration data is met by
one allocation over the whole model, as the whole-model compression makes it
(:func:`whole_model_allocation`): a first pass reads the blocks one at a time and keeps only the
numbers of each layer's rank ladder (parameters and estimated errors per rank step:
:func:`~ttcompress.compression.allocate.slot_ladders`),
:func:`~ttcompress.compression.allocate.allocate_levels` allocates the ranks of every layer at
once, then each block is compressed at its layers' levels (the ladders of the block computed
again for their build options, :meth:`Allocation.for_part`). With calibration data the ranks
follow each block's measured output errors, which depend on the blocks compressed before it:
such a plan is met block by block (each block, and the rest, at the ratio), not by one
allocation over the whole model (:data:`PER_BLOCK_RATIO` says so).

The plan's layer patterns are checked once against the whole model's layer names (a pattern
that selects layers of one block only is no error in the other blocks).

Supported: the decoders whose blocks take ``(hidden_states, attention_mask=..., position_embeddings=...)``
and whose head is ``lm_head(norm(h))``: :data:`BLOCKWISE_MODEL_TYPES`. Any other directory is
loaded whole (:func:`ttcompress.checkpoint.hf.load_hf_dir`).
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress._version import __version__
from ttcompress.calibration.data import calib_batches
from ttcompress.checkpoint.header import check_layer_counts
from ttcompress.checkpoint.hf import (
    _auto_classes,
    _copy_plain_files,
    _instantiate,
    _layer_records,
    _make_config,
    _model_class,
    _untie_if_untied,
    _write_generation_config,
    hf_arch,
)
from ttcompress.checkpoint.hf_config import label_bound
from ttcompress.checkpoint.hf_files import (
    COMPRESSED_INDEX_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_VERSION,
    TensorReader,
    check_fit,
    copy_weights,
    key_map,
    open_weights,
    read_json,
    release_shard,
    single_weights,
    state_groups,
)
from ttcompress.checkpoint.hf_remote import MODELING_FILE, modeling_source, remote_config
from ttcompress.compression.allocate import allocate_levels, slot_ladders
from ttcompress.compression.plan import LayerDecision, Plan, allocation_slots, check_patterns_match, pattern_names
from ttcompress.compression.pipeline import (
    CompressionResult,
    DecomposeResult,
    compress_with_report,
    nothing_compressed,
    target_device,
)
from ttcompress.compression.surgery import as_plan
from ttcompress.compression.surgery_checks import check_finite_parameters, guard_reasons
from ttcompress.formats.base import Ladder
from ttcompress.formats.structure import preview_preparation
from ttcompress.errors import CheckpointError, InputError, UserInputError
from ttcompress.fsutil import atomic_dir, check_not_inputs, strip_model_suffix
from ttcompress.inputs import MASK_KEY, call_model, input_mask
from ttcompress.layer_report import LayerReport, count_params
from ttcompress.modtree import get_submodule, set_submodule

__all__ = ["Allocation", "BLOCKWISE_MODEL_TYPES", "PER_BLOCK_RATIO", "BlockProgressFn", "compress_sharded",
           "decompose_sharded", "default_sharded_output", "for_each_part", "is_blockwise_dir", "model_parts", "rest_model",
           "whole_model_allocation"]

#: ``model_type`` values whose sharded directories are compressed block by block.
BLOCKWISE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
#: ``progress(done, total, label)``: before each block (``label`` its name), and at the end.
BlockProgressFn = Callable[[int, int, str], None]

_SHARD = "model.ttcompress-{:05d}-of-{:05d}.safetensors"

#: Said where a calibrated ``target_ratio`` run is made block by block.
PER_BLOCK_RATIO = ("with calibration data the target ratio is met block by block (each block and the layers "
                   "outside the blocks at the ratio), not by one allocation over the whole model")


def is_blockwise_dir(path: str | Path) -> bool:
    """Whether ``path`` is a sharded, not yet compressed directory of a :data:`BLOCKWISE_MODEL_TYPES` model.

    Only the file names and ``config.json`` are looked at; :func:`compress_sharded` checks the rest.
    """
    d = Path(path)
    if not d.is_dir() or not (d / INDEX_FILE).is_file() or (d / RECORD_FILE).exists():
        return False
    try:
        if single_weights(d) is not None:
            return False
        config = read_json(d / CONFIG_FILE, "config.json")
    except CheckpointError:
        return False  # the whole-model loader says what is wrong
    return config.get("model_type") in BLOCKWISE_MODEL_TYPES and "auto_map" not in config


# --------------------------------------------------------------------------------------------------
# Shells: a part of the model under its whole-model names, run on carried hidden states
# --------------------------------------------------------------------------------------------------
class _Shell(nn.Module):
    """Holds some of the model's modules under their whole-model names (``model.layers.3``).

    Its input is a mapping with ``hidden_states`` (the compressed model's stream),
    ``dense_hidden_states`` (the dense model's), ``attention_mask`` (the padding mask, so that
    padded positions stay out of the statistics) and ``batch`` (which calibration batch, for the
    block's other arguments). The shell :func:`compress_with_report` is given is the dense model;
    the copy it calibrates (a deep copy) reads the compressed stream: the copy is told apart by
    its identity (``id(self)`` differs from the one recorded at construction).
    """

    def __init__(self, modules: Mapping[str, nn.Module], run: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
                 ) -> None:
        super().__init__()
        for name, module in modules.items():
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, module)
        self._run = run
        self._origin = id(self)

    def forward(self, hidden_states: torch.Tensor, dense_hidden_states: torch.Tensor,
                batch: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = dense_hidden_states if id(self) == self._origin else hidden_states
        return self._run(self, x, int(batch.reshape(-1)[0]))


class _Captured(Exception):
    """Raised by :class:`_Catcher` once it holds the first block's arguments."""


class _Catcher(nn.Module):
    """Stands in for the first block: records its input and keyword arguments, then stops the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise CheckpointError("the decoder block is called with positional arguments besides the hidden "
                                  "states: block-wise compression does not know this architecture")
        self.seen.append((hidden_states.detach(), dict(kwargs)))
        raise _Captured


def _rows(value: Any, n: int) -> Any:
    """``value`` cut to the first ``n`` samples where it has more (a batch's mask; not rotary tables of batch 1)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > n:
        return value[:n]
    if isinstance(value, tuple):
        return tuple(_rows(v, n) for v in value)
    return value


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


# --------------------------------------------------------------------------------------------------
# The model's parts
# --------------------------------------------------------------------------------------------------
@dataclass
class _Parts:
    """The model as block-wise compression sees it."""

    cls: type[nn.Module]
    config: Any
    config_dict: dict[str, Any]
    probe: nn.Module  # the whole model on the meta device
    blocks_path: str  # "model.layers"
    base_path: str  # "model" ("" when the class is the base model)
    keys: dict[str, str]  # stored name -> model name

    @property
    def count(self) -> int:
        return len(get_submodule(self.probe, self.blocks_path))

    def block_keys(self, index: int) -> dict[str, str]:
        prefix = f"{self.blocks_path}.{index}."
        return {s: k for s, k in self.keys.items() if k.startswith(prefix)}

    def rest_keys(self) -> dict[str, str]:
        prefix = f"{self.blocks_path}."
        return {s: k for s, k in self.keys.items() if not k.startswith(prefix)}


def model_parts(d: Path, shapes: Mapping[str, tuple[int, ...]]) -> _Parts:
    """Check the directory's config and tensors (shapes against a meta skeleton) and find the blocks."""
    config_dict = read_json(d / CONFIG_FILE, "config.json")
    check_layer_counts(config_dict, len(shapes), str(d / CONFIG_FILE))
    config = _make_config(config_dict, str(d / CONFIG_FILE), max_labels=label_bound(shapes.values()))
    archs = config_dict.get("architectures")
    cls = _model_class(config, archs[0] if isinstance(archs, list) and archs else None, where=str(d), strict=False)
    probe = _instantiate(cls, config, device="meta", where=str(d))
    keys = key_map(probe, shapes)
    check_fit(probe, {keys[k]: shapes[k] for k in keys}, str(d))
    prefix = str(getattr(probe, "base_model_prefix", "") or "")
    base_path = prefix if prefix and isinstance(getattr(probe, prefix, None), nn.Module) else ""
    base = get_submodule(probe, base_path) if base_path else probe
    if not all(isinstance(getattr(base, a, None), nn.Module) for a in ("embed_tokens", "layers", "norm")) \
            or not isinstance(base.layers, nn.ModuleList) or len(base.layers) == 0:
        raise CheckpointError(f"{d}: {cls.__name__} has no embed_tokens / layers / norm: it cannot be "
                              "compressed block by block")
    blocks_path = f"{base_path}.layers" if base_path else "layers"
    return _Parts(cls, config, config_dict, probe, blocks_path, base_path, keys)


def rest_model(parts: _Parts, read: TensorReader, where: str) -> nn.Module:
    """The model without its blocks, on the CPU, with the stored weights (built from the config with
    no blocks, so that buffers computed at construction, e.g. rotary tables, are right)."""
    config = copy.deepcopy(parts.config)
    config.num_hidden_layers = 0
    rest = _instantiate(parts.cls, config, device="cpu", where=where)
    copy_weights(rest, parts.rest_keys(), read, where)
    release_shard(read)
    return rest.eval()


def _load_block(parts: _Parts, index: int, read: TensorReader, where: str) -> nn.Module:
    """Block ``index`` on the CPU with its stored tensors (its skeleton comes from the meta model)."""
    block = copy.deepcopy(get_submodule(parts.probe, f"{parts.blocks_path}.{index}")).to_empty(device="cpu")
    persistent = set(block.state_dict())
    named_buffers = {n for n, _ in block.named_buffers()}
    if named_buffers - persistent:
        raise CheckpointError(f"{where}: block {index} has buffers that are not stored "
                              f"({sorted(named_buffers - persistent)[0]}); it cannot be loaded on its own")
    prefix = f"{parts.blocks_path}.{index}."
    local = {stored: key[len(prefix):] for stored, key in parts.block_keys(index).items()}
    with torch.no_grad():
        state = block.state_dict(keep_vars=True)
        if set(local.values()) != set(state):
            missing = sorted(set(state) - set(local.values()))
            raise CheckpointError(f"{where}: block {index}: tensor {prefix}{missing[0]} is not stored")
        for stored, key in local.items():
            state[key].copy_(read(stored))
    release_shard(read)  # the shard's mapped pages leave memory: one block resident, not one shard
    return block.eval()


# --------------------------------------------------------------------------------------------------
# Calibration streams
# --------------------------------------------------------------------------------------------------
@dataclass
class _Streams:
    """The calibration batches' hidden states at the current block, in both models, and what every block
    is called with besides them (the model computes it once: causal mask, rotary embeddings)."""

    dense: list[torch.Tensor]
    compressed: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    kwargs: list[dict[str, Any]]

    def batches(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for i, (hc, hd, mask) in enumerate(zip(self.compressed, self.dense, self.masks)):
            batch = {"hidden_states": hc, "dense_hidden_states": hd,
                     "batch": torch.full((hc.shape[0],), i, dtype=torch.long)}
            if mask is not None:
                batch[MASK_KEY] = mask
            out.append(batch)
        return out


def _capture(rest: nn.Module, parts: _Parts, batches: list[Any]) -> _Streams:
    """Run the model without blocks up to its first block on every batch: the hidden states and arguments."""
    layers = get_submodule(rest, parts.blocks_path)
    catcher = _Catcher()
    layers.append(catcher)
    rest.config.num_hidden_layers = 1
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    call_model(rest, batch)
                except _Captured:
                    continue
                raise CheckpointError("the model never called its first block: block-wise compression does not "
                                      "know this architecture")
    finally:
        del layers[0]
        rest.config.num_hidden_layers = 0
    hidden = [h for h, _ in catcher.seen]
    kwargs = [{k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value")}
              for _, kw in catcher.seen]
    for kw in kwargs:
        kw["use_cache"] = False
    return _Streams(list(hidden), list(hidden), [input_mask(b) for b in batches], kwargs)


def _run_block(streams: _Streams, path: str) -> Callable[[nn.Module, torch.Tensor, int], torch.Tensor]:
    def run(shell: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
        kwargs = {k: _rows(v, x.shape[0]) for k, v in streams.kwargs[index].items()}
        return _output(get_submodule(shell, path)(x, **kwargs))
    return run


def _run_head(parts: _Parts, has_head: bool) -> Callable[[nn.Module, torch.Tensor, int], torch.Tensor]:
    norm = f"{parts.base_path}.norm" if parts.base_path else "norm"

    def run(shell: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
        h = get_submodule(shell, norm)(x)
        return get_submodule(shell, "lm_head")(h) if has_head else h
    return run


def _outputs(shell: _Shell, stream: list[torch.Tensor]) -> list[torch.Tensor]:
    """The shell's outputs on one stream, batch by batch."""
    with torch.no_grad():
        return [_output(shell._run(shell, h, i)) for i, h in enumerate(stream)]


# --------------------------------------------------------------------------------------------------
# The whole model, one part at a time: previews and the rank allocation
# --------------------------------------------------------------------------------------------------
def for_each_part(parts: _Parts, rest: nn.Module, read: TensorReader, where: str,
                  visit: Callable[[nn.Module], None]) -> None:
    """``visit(shell)`` for the layers outside the blocks (of ``rest``), then for each block with its
    stored weights: one block in memory at a time (loaded, visited, freed before the next loads;
    ``visit`` must keep no reference to the shell)."""
    visit(_Shell(_rest_modules(parts, rest), _no_run))
    for index in range(parts.count):
        path = f"{parts.blocks_path}.{index}"
        shell = _Shell({path: _load_block(parts, index, read, where)}, _no_run)
        visit(shell)
        del shell
        gc.collect()


def _part_ladders(shell: nn.Module, plan: Plan) -> tuple[list[LayerDecision], dict[int, Ladder]]:
    """The allocator's view of one part: its layers' lowest-rank decisions and rank ladders."""
    prep = preview_preparation(shell)
    return slot_ladders(allocation_slots(prep.model, plan, guard_reasons(prep)))


@dataclass(frozen=True)
class Allocation:
    """A whole-model rank allocation of a model read one part at a time (:func:`whole_model_allocation`).

    Attributes
    ----------
    plan : Plan
        The plan, with its ``target_ratio``.
    levels : dict of str to int
        The level of each layer compressed at a step of its rank ladder.
    decided : dict of str to LayerDecision
        The decisions of the other layers (kept dense, not selected, or with ranks a rule fixed).
    """

    plan: Plan
    levels: dict[str, int]
    decided: dict[str, LayerDecision]

    def for_part(self, shell: nn.Module) -> dict[str, LayerDecision]:
        """The decisions of the part ``shell``'s layers: its ladders are computed again (the same
        numbers as in the first pass) for each laddered layer's options at its level."""
        decisions, ladders = _part_ladders(shell, self.plan)
        out = {}
        for i, d in enumerate(decisions):
            k = self.levels.get(d.name)
            if k is not None and i in ladders:
                out[d.name] = replace(d, options=ladders[i].options[k], params_after=ladders[i].params[k])
            else:
                out[d.name] = self.decided.get(d.name, d)
        return out


def whole_model_allocation(parts: _Parts, rest: nn.Module, read: TensorReader, where: str,
                           plan: Plan) -> Allocation | None:
    """The data-free allocation of ``plan.target_ratio`` over the whole model (None without a target
    ratio), from one pass over its parts (:func:`for_each_part`) that keeps each layer's ladder
    numbers (parameters and estimated errors per rank step, ~45 kB for a 2,816 x 1,024
    layer), never its weights or the
    ladder's build options; the ranks of every layer are then allocated at once, in the whole
    model's layer order, as :func:`~ttcompress.compression.plan.plan_layers` allocates them on the
    whole model (:func:`~ttcompress.compression.allocate.allocate_levels`)."""
    if plan.target_ratio is None:
        return None
    gathered: list[tuple[LayerDecision, Ladder | None]] = []

    def visit(shell: nn.Module) -> None:
        check_finite_parameters(shell)  # as compress does, before any spectrum
        decisions, ladders = _part_ladders(shell, plan)
        gathered.extend((d, None if i not in ladders else Ladder(ladders[i].params, ladders[i].errors, ()))
                        for i, d in enumerate(decisions))

    for_each_part(parts, rest, read, where, visit)
    order = {name: i for i, name in enumerate(pattern_names(parts.probe))}
    gathered.sort(key=lambda item: order.get(item[0].name, len(order)))
    decisions = [d for d, _l in gathered]
    ladders = {i: ladder for i, (_d, ladder) in enumerate(gathered) if ladder is not None}
    levels, dense = allocate_levels(decisions, ladders, total=count_params(parts.probe),
                                    target_ratio=float(plan.target_ratio), min_saving=plan.saving_floor(False),
                                    max_error=plan.max_error)
    return Allocation(plan, {decisions[i].name: k for i, k in levels.items()},
                      {d.name: dense.get(i, d) for i, d in enumerate(decisions) if i not in levels})


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------
@dataclass
class _Written:
    """Shards written so far: ``weight_map`` and the per-layer records of the compressed model."""

    weight_map: dict[str, str]
    records: list[LayerReport]
    layer_meta: dict[str, dict[str, Any]]
    params_after: int = 0


def _write_shard(tmp: Path, name: str, state: Mapping[str, torch.Tensor], written: _Written) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    written.weight_map.update(dict.fromkeys(tensors, name))


def _compress_part(shell: _Shell, plan: Plan, streams: _Streams | None, total: int, *, device: Any,
                   calib_memory: Any, written: _Written, allocation: Allocation | None) -> nn.Module:
    """Compress the shell's layers (calibrated on the streams when there are any; with its decisions
    in the whole-model ``allocation`` when there is one); record them."""
    result = compress_with_report(shell, plan, calib_data=streams.batches() if streams is not None else None,
                                  device=device, calib_memory=calib_memory, total_params=total,
                                  decisions=None if allocation is None else allocation.for_part(shell))
    written.records.extend(result.records)
    records = _layer_records(result.model)
    written.layer_meta.update(records)
    return result.model


def compress_sharded(
    source: str | Path,
    dest: str | Path,
    *,
    plan: Plan,
    calib_data: Any = None,
    calib_samples: int | None = None,
    calib_memory: int | str | None = None,
    device: str | torch.device | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: BlockProgressFn | None = None,
    require: Callable[[CompressionResult], str | None] | None = None,
) -> CompressionResult:
    """Compress the sharded directory ``source`` block by block into the sharded directory ``dest``.

    Parameters
    ----------
    source : path
        A directory with ``config.json``, ``model.safetensors.index.json`` and its shards, of a
        :data:`BLOCKWISE_MODEL_TYPES` model (:func:`is_blockwise_dir`).
    dest : path
        The directory to write, atomically (nothing is there unless everything succeeded).
    plan : Plan
        As for :func:`~ttcompress.compression.pipeline.compress_with_report`; layer names are the
        whole model's. A ``target_ratio`` is met by one allocation over the whole model without
        calibration data (two passes over the shards), block by block with it (module docstring).
    calib_data, calib_samples : optional
        Calibration inputs of the whole model (token ids, or mappings with ``input_ids`` and
        ``attention_mask``), as for :func:`~ttcompress.compression.pipeline.compress_with_report`.
    calib_memory, device : optional
        As for :func:`~ttcompress.compression.pipeline.compress_with_report`.
    info : mapping, optional
        JSON merged into the record's ``info`` (the plan is recorded as ``plan``).
    overwrite : bool, default False
        Replace an existing ``dest``.
    progress : callable, optional
        ``progress(done, total, label)`` before each block and once at the end.
    require : callable, optional
        ``require(result)``: a reason to refuse the result (a :class:`~ttcompress.errors.UserInputError`
        raised before the directory is moved into place, so nothing is written), or None.

    Returns
    -------
    CompressionResult
        Its ``model`` is the model without its blocks (the blocks were written and freed); its
        records are every compressible layer's, in block order.

    Raises
    ------
    CheckpointError
        A shard the index names is missing, a tensor's shape disagrees with the config, or the
        architecture is not one block-wise compression knows; nothing is written.
    """
    src = Path(source)
    where = str(src)
    with open_weights(src, trust_pickle=False) as (shapes, read):
        parts = model_parts(src, shapes)
        check_patterns_match(plan, pattern_names(parts.probe))
        total = count_params(parts.probe)
        rest = rest_model(parts, read, where)
        batches = None if calib_data is None else list(calib_batches(calib_data, max_samples=calib_samples))
        if batches is not None and not batches:
            raise InputError("calib_data", "holds no samples")
        streams = _capture(rest, parts, batches) if batches else None
        allocation = None if batches else whole_model_allocation(parts, rest, read, where, plan)
        count = parts.count
        written = _Written({}, [], {})
        with atomic_dir(Path(dest), overwrite=overwrite) as tmp:
            for index in range(count):
                name = f"{parts.blocks_path}.{index}"
                if progress is not None:
                    progress(index, count + 1, name)
                _block_step(parts, index, read, where, streams, plan, total, tmp, written, count + 1,
                            device=device, calib_memory=calib_memory, allocation=allocation)
            if progress is not None:
                progress(count, count + 1, "head")
            has_head = isinstance(getattr(rest, "lm_head", None), nn.Module)
            rest = _head_step(parts, rest, has_head, streams, plan, total, tmp, written, count + 1,
                              device=device, calib_memory=calib_memory, allocation=allocation)
            result = CompressionResult(rest, tuple(written.records), total, written.params_after, plan)
            reason = require(result) if require is not None else None
            if reason is not None:
                raise UserInputError(reason)
            _write_directory(src, tmp, parts, rest, plan, written, info)
            if progress is not None:
                progress(count + 1, count + 1, "")
    return result


def _block_step(parts: _Parts, index: int, read: TensorReader, where: str, streams: _Streams | None, plan: Plan,
                total: int, tmp: Path, written: _Written, shards: int, *, device: Any, calib_memory: Any,
                allocation: Allocation | None) -> None:
    """Load block ``index``, carry the dense stream through it, compress it, carry the compressed
    stream, write its shard; the block is freed when this returns."""
    path = f"{parts.blocks_path}.{index}"
    block = _load_block(parts, index, read, where)
    shell = _Shell({path: block}, _run_block(streams, path) if streams is not None else _no_run)
    del block
    dense_next = _outputs(shell, streams.dense) if streams is not None else None  # the dense block's
    shell = _compress_part(shell, plan, streams, total, device=device, calib_memory=calib_memory, written=written,
                           allocation=allocation)
    if streams is not None and dense_next is not None:
        streams.compressed = _outputs(shell, streams.compressed)
        streams.dense = dense_next
    written.params_after += count_params(shell)
    _write_shard(tmp, _SHARD.format(index + 1, shards), shell.state_dict(), written)
    del shell
    gc.collect()


def _no_run(shell: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    raise RuntimeError("a data-free shell is never run")


def _rest_modules(parts: _Parts, rest: nn.Module) -> dict[str, nn.Module]:
    """The layers outside the blocks under their whole-model names (the base model's children but
    not its empty block list, and the head)."""
    modules = {n: m for n, m in rest.named_children() if count_params(m) or n == parts.base_path}
    if parts.base_path:
        base = get_submodule(rest, parts.base_path)
        modules.pop(parts.base_path)
        modules.update({f"{parts.base_path}.{n}": m for n, m in base.named_children() if n != "layers"})
    return modules


def _head_step(parts: _Parts, rest: nn.Module, has_head: bool, streams: _Streams | None, plan: Plan, total: int,
               tmp: Path, written: _Written, shards: int, *, device: Any, calib_memory: Any,
               allocation: Allocation | None) -> nn.Module:
    """Compress the layers outside the blocks (the output layer on the final hidden states), write
    their shard; return the model without blocks, compressed."""
    shell = _Shell(_rest_modules(parts, rest), _run_head(parts, has_head))
    shell = _compress_part(shell, plan, streams, total, device=device, calib_memory=calib_memory, written=written,
                           allocation=allocation)
    for name in written.layer_meta:  # the new layers of the shell go back into the model
        if not name.startswith(f"{parts.blocks_path}."):
            rest = set_submodule(rest, name, get_submodule(shell, name))
    written.params_after += count_params(rest)
    state = rest.state_dict(keep_vars=True)
    tied = {o for first, others in state_groups(rest).items() for o in others if o in state}
    _write_shard(tmp, _SHARD.format(shards, shards), {k: v for k, v in state.items() if k not in tied}, written)
    return rest


def _write_directory(src: Path, tmp: Path, parts: _Parts, rest: nn.Module, plan: Plan, written: _Written,
                     info: Mapping[str, Any] | None) -> None:
    """``config.json``, the index, ``ttcompress.json``, ``modeling_ttcompress.py`` and the source's plain files."""
    _copy_plain_files(src, tmp)
    rest.config.num_hidden_layers = parts.count
    arch = hf_arch(rest)
    layers = dict(sorted(written.layer_meta.items()))
    state = rest.state_dict(keep_vars=True)
    tied = {o: first for first, others in state_groups(rest).items() for o in others if o in state}
    record = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "ttcompress_version": __version__,
        "arch": {"name": arch["name"], "kwargs": {k: v for k, v in arch["kwargs"].items() if k != "config"}},
        "layers": layers, "plan": plan.to_dict(),
        "info": {"plan": plan.to_dict(), "blockwise": True, **dict(info or {})}, "tied": tied,
    }
    config = _untie_if_untied(rest, arch["kwargs"]["config"])
    config = remote_config(config, base_class=type(rest).__name__, layers=layers,
                           auto_classes=_auto_classes(config["model_type"], type(rest).__name__),
                           conv1d_as_linear=False)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    size = sum((tmp / f).stat().st_size for f in set(written.weight_map.values()))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(written.weight_map.items()))}
    (tmp / COMPRESSED_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n",
                                   encoding="utf-8")
    (tmp / MODELING_FILE).write_text(modeling_source(config_class=type(rest.config).__name__,
                                                     model_class=type(rest).__name__, version=__version__),
                                     encoding="utf-8")
    _write_generation_config(rest, tmp)



def default_sharded_output(source: str | Path) -> Path:
    """``dir/llama`` -> ``dir/llama.tt`` (a directory, as the input is)."""
    p = Path(source)
    return p.with_name(strip_model_suffix(p.name) + ".tt")


def decompose_sharded(
    source: str | Path,
    *,
    output: str | Path | None = None,
    plan: Plan | Mapping[str, Any] | None = None,
    progress: BlockProgressFn | None = None,
    calib_data: Any = None,
    calib_samples: int | None = None,
    calib_info: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    calib_memory: int | str | None = None,
    overwrite: bool = False,
) -> DecomposeResult:
    """:func:`~ttcompress.compression.pipeline.decompose_file` for a sharded directory
    (:func:`is_blockwise_dir`): :func:`compress_sharded` into ``output`` (default
    :func:`default_sharded_output`), with the plan, the source and the calibration recorded.

    A run that compresses no layer writes nothing (:class:`~ttcompress.errors.UserInputError`).
    """
    plan = as_plan(plan)
    target = target_device(device)
    src = Path(source)
    dest = Path(output) if output is not None else default_sharded_output(src)
    check_not_inputs([dest], [src])
    calibration = {"used": calib_data is not None, **dict(calib_info or {})}
    info = {"source": src.name, "source_path": str(src.resolve()), "calibration": calibration}
    result = compress_sharded(src, dest, plan=plan, calib_data=calib_data, calib_samples=calib_samples,
                              calib_memory=calib_memory, device=target, info=info, overwrite=overwrite,
                              progress=progress, require=lambda r: None if r.compressed else nothing_compressed(r))
    return DecomposeResult(result, src, "hf_dir", dest, calibration)
