"""Reading a Hugging Face model directory: file names, JSON, safetensors shards, key mapping, checks.

The helpers of :func:`ttcompress.checkpoint.hf.load_hf_dir` (and the constants :func:`ttcompress.checkpoint.hf.save_hf_dir`
writes by). Every shape is read from the safetensors headers and checked against the model built
from the config before any tensor is copied; pickled weights are read only with ``trust_pickle``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttcompress.errors import CheckpointError, UnsafePickleError, few, shape_mismatches, short_error
from ttcompress.checkpoint.header import validate_header
from ttcompress.checkpoint.smallfile import MAX_SMALL_FILE_BYTES, check_regular_file, read_small_text

__all__ = [
    "COMPRESSED_INDEX_FILE",
    "COMPRESSED_WEIGHTS_FILE",
    "CONFIG_FILE",
    "INDEX_FILE",
    "PICKLE_FILES",
    "RECORD_FILE",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "WEIGHTS_FILE",
    "PathLike",
    "TensorReader",
    "release_shard",
    "check_fit",
    "copy_weights",
    "few",
    "identity_groups",
    "index_file",
    "is_hf_dir",
    "key_map",
    "open_weights",
    "read_json",
    "read_record",
    "state_groups",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: A compressed model's weights: transformers' ``variant="ttcompress"`` name, so that no transformers
#: class finds them except the directory's own (see :mod:`ttcompress.checkpoint.hf_remote`).
COMPRESSED_WEIGHTS_FILE = "model.ttcompress.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: A sharded compressed model's index (transformers' ``variant="ttcompress"`` name of :data:`INDEX_FILE`).
COMPRESSED_INDEX_FILE = "model.safetensors.index.ttcompress.json"
RECORD_FILE = "ttcompress.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
RECORD_FORMAT = "ttcompress-hf"
RECORD_VERSION = 1
MAX_JSON_BYTES = MAX_SMALL_FILE_BYTES

PathLike = str | os.PathLike[str]
TensorReader = Callable[[str], torch.Tensor]


def is_hf_dir(path: PathLike) -> bool:
    """Whether ``path`` is a directory with ``config.json`` and safetensors weights.

    The weights are ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Any other
    directory (e.g. one holding only ``pytorch_model.bin``) gives ``False``; :func:`load_hf_dir`
    explains what is wrong with it.
    """
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (single_weights(p) is not None or index_file(p) is not None)


def index_file(d: Path) -> Path | None:
    """``d``'s safetensors index (a dense model's, or a sharded compressed model's), if any."""
    for name in (INDEX_FILE, COMPRESSED_INDEX_FILE):
        if os.path.lexists(d / name):
            return d / name
    return None


def single_weights(d: Path) -> Path | None:
    """``d``'s one-file safetensors weights (``model.safetensors``, or a compressed model's), if any.

    A name that is there as anything but a regular file (or a symlink to one) is refused, not
    skipped (:func:`_check_weights_file`)."""
    for name in (WEIGHTS_FILE, COMPRESSED_WEIGHTS_FILE):
        if os.path.lexists(d / name):
            _check_weights_file(d / name)
            return d / name
    return None


def read_json(p: Path, what: str) -> dict[str, Any]:
    """A JSON object from a regular file of at most :data:`MAX_JSON_BYTES` (a FIFO, a device or a
    larger file is refused before it is read: :func:`ttcompress.checkpoint.smallfile.read_small_file`)."""
    try:
        data = json.loads(read_small_text(p, what=what, limit=MAX_JSON_BYTES, error=CheckpointError))
    except FileNotFoundError:
        raise CheckpointError(f"{p.parent}: no {p.name} (not a Hugging Face model directory)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{p}: invalid {what}: {short_error(exc)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: {what} must be a JSON object")
    return data


def shard_files(d: Path) -> list[Path]:
    """The safetensors files of ``d`` (one file or the shards its index names)."""
    single = single_weights(d)
    if single is not None:
        return [single]
    index = index_file(d) or d / INDEX_FILE
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    files = []
    for name in sorted({str(v) for v in weight_map.values()}):
        if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: invalid shard name {name!r}")
        if not os.path.exists(d / name):
            raise CheckpointError(f"{d}: shard {name} named by {index.name} is missing")
        _check_weights_file(d / name)
        files.append(d / name)
    return files


def _check_weights_file(p: Path) -> None:
    """A weights file may be a symlink, to anywhere (a hub cache's snapshot links into its blobs),
    but what it resolves to must be a regular file: never a FIFO, a device or a directory."""
    try:
        check_regular_file(p, what="safetensors file", error=CheckpointError)
    except FileNotFoundError:
        raise CheckpointError(f"{p} is a broken symlink (expected a safetensors file)") from None


@contextlib.contextmanager
def open_weights(d: Path, *, trust_pickle: bool) -> Iterator[tuple[dict[str, tuple[int, ...]], TensorReader]]:
    """Yield ``(shapes, read)``: every stored tensor's shape (from the headers) and a reader."""
    if single_weights(d) is None and index_file(d) is None:
        if (d / PICKLE_FILES[0]).is_file() and trust_pickle:
            yield from open_pickle(d / PICKLE_FILES[0])
            return
        if (d / PICKLE_FILES[1]).is_file() and trust_pickle:
            raise CheckpointError(f"{d}: sharded pickle weights ({PICKLE_FILES[1]}) are not supported")
        if any((d / name).is_file() for name in PICKLE_FILES):
            raise UnsafePickleError(
                f"{d}: the weights are a pickle ({PICKLE_FILES[0]}); loading it could run code: convert it to "
                f"{WEIGHTS_FILE} or pass trust_pickle=True"
            )
        raise CheckpointError(f"{d}: no weights ({WEIGHTS_FILE} or {INDEX_FILE})")
    from safetensors import SafetensorError, safe_open

    owner: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in shard_files(d):  # the headers only, one shard open at a time
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file: {short_error(exc)}") from None
        twice = sorted(set(keys) & set(shapes))
        if twice:
            raise CheckpointError(f"{d}: tensor(s) stored in several shards: {few(twice)}")
        shapes.update(keys)
        owner.update(dict.fromkeys(keys, path))
    # Reading opens a key's shard when it is not the one open, closing the other: the keys come
    # shard by shard (``shapes`` is in shard order), so each shard is mapped once and alone.
    current: list[Any] = [None, None, contextlib.ExitStack()]  # path, handle, its exit

    def release() -> None:
        current[2].close()
        current[:] = [None, None, contextlib.ExitStack()]

    def read(key: str) -> torch.Tensor:
        if current[0] != owner[key]:
            release()
            current[1] = current[2].enter_context(safe_open(str(owner[key]), framework="pt", device="cpu"))
            current[0] = owner[key]
        return current[1].get_tensor(key)

    read.release = release  # type: ignore[attr-defined]  # see release_shard
    try:
        yield shapes, read
    finally:
        current[2].close()


def release_shard(read: TensorReader) -> None:
    """Close the shard a reader of :func:`open_weights` holds open, if any (the next read opens it again).

    A shard is memory-mapped while it is open, and the pages of the tensors read from it stay in the
    process's resident set until it is closed: a caller that keeps only part of the model (one
    transformer block, :mod:`ttcompress.compression.blockwise`) releases the shard after each part,
    so that what is resident is that part, not the rest of a shard that can be many parts long.
    """
    release = getattr(read, "release", None)
    if callable(release):
        release()


def open_pickle(path: Path) -> Iterator[tuple[dict[str, tuple[int, ...]], TensorReader]]:
    """The trust_pickle path: a ``pytorch_model.bin`` state dict, read with ``weights_only``."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign file is one line
        raise CheckpointError(f"{path}: cannot read the state dict: {short_error(exc)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    yield {str(k): tuple(v.shape) for k, v in sd.items()}, sd.__getitem__


def key_map(model: nn.Module, stored: Iterable[str]) -> dict[str, str]:
    """Map stored tensor names to the model's state-dict names.

    A ``base_model_prefix`` (``transformer.``, ``bert.``) is added or removed where that is what
    matches; names in a layout transformers renames on load (its checkpoint conversion mapping:
    ViT's stored ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj`` in
    transformers 5) are renamed as it renames them (pure renames only: a tensor it would merge or
    split stays unmatched); names the class declares ignorable
    (``_keys_to_ignore_on_load_unexpected``, e.g. GPT-2's old causal-mask buffers) are dropped. An unmatched name maps to itself (unexpected).
    """
    expected = set(model.state_dict())
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    ignore = [re.compile(p) for p in getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or ()]
    renames = _legacy_renamings(model)
    mapping: dict[str, str] = {}
    for key in stored:
        candidates = []
        for name in (key, _renamed(key, renames)):
            candidates += [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [name]
        target = next((c for c in candidates if c in expected), None)
        if target is None and any(p.search(key) for p in ignore):
            continue
        mapping[key] = target or key
    return mapping


def _legacy_renamings(model: nn.Module) -> list[Any]:
    """transformers' pure key renamings for ``model`` (none when it has no such API or mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return []
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - not a PreTrainedModel, or an API change: no renaming
        return []
    return [t for t in transforms if not isinstance(t, WeightConverter) and hasattr(t, "rename_source_key")]


def _renamed(key: str, renamings: Iterable[Any]) -> str:
    for t in renamings:  # in order; every matching renaming applies (they may chain), as transformers does
        try:
            key = t.rename_source_key(key)[0]
        except Exception:  # noqa: BLE001 - a renaming that cannot handle this key leaves it
            continue
    return key


def check_fit(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse (one line) unless the stored shapes (by model key) fill the model's state dict.

    A key may be absent when a tied alias of it is stored.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    covered = set(shapes)
    for first, others in state_groups(model).items():
        if covered & {first, *others}:
            covered |= {first, *others}
    problems = shape_mismatches(expected, shapes, covered=covered, noun="tensor", pair="file vs config")
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the config: " + "; ".join(problems))


def copy_weights(model: nn.Module, key_map: Mapping[str, str], read: TensorReader, where: str) -> None:
    """Copy every stored tensor into the model (already checked to fit); tied copies must agree."""
    state = model.state_dict(keep_vars=True)
    alias = {o: first for first, others in state_groups(model).items() for o in others}
    written: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for stored, key in key_map.items():
            tensor = read(stored)
            canon = alias.get(key, key)
            if canon in written:
                if not torch.equal(written[canon].to(tensor.dtype), tensor):
                    raise CheckpointError(f"{where}: tied tensors {key} and {canon} differ in the file")
                continue
            state[key].copy_(tensor)
            written[canon] = state[key].detach()


def read_record(d: Path) -> dict[str, Any]:
    """The ``ttcompress.json`` of a directory (empty without one; one that is there but is not a
    regular file, e.g. a FIFO, is refused)."""
    if not os.path.lexists(d / RECORD_FILE):
        return {}
    where = str(d / RECORD_FILE)
    record = read_json(d / RECORD_FILE, "ttcompress record")
    if record.get("format") != RECORD_FORMAT or not isinstance(record.get("version"), int):
        raise CheckpointError(f"{where}: not a ttcompress record (format {record.get('format')!r})")
    if record["version"] > RECORD_VERSION:
        raise CheckpointError(f"{where}: record version {record['version']} is newer than this ttcompress")
    # The same field checks as a checkpoint header (arch, layers, tied, info), so that every reader
    # of the record (the loader, report, finetune) can trust its types.
    validate_header(record, source=where, max_version=RECORD_VERSION)
    if record.get("plan") is not None and not isinstance(record["plan"], Mapping):
        raise CheckpointError(f"{where}: field plan must be an object or null, got {type(record['plan']).__name__}")
    linear = ((record.get("arch") or {}).get("kwargs") or {}).get("conv1d_as_linear", False)
    if not isinstance(linear, bool):
        raise CheckpointError(f"{where}: field arch.kwargs.conv1d_as_linear must be true or false, got {linear!r}")
    return record


def identity_groups(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return {names[0]: names[1:] for names in groups.values() if len(names) > 1}


def state_groups(model: nn.Module) -> dict[str, list[str]]:
    """Like :func:`tied_parameters`, over parameters and buffers (the state dict's aliases)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return identity_groups(named)
