"""Load models in every accepted form; save and load ttcompress checkpoints.

Accepted inputs (:func:`load`)
------------------------------
1. **A ttcompress checkpoint** (written by :func:`save`): self-describing, loads with no flags.
2. **A state dict plus an architecture name** (``arch``): ``.pt``/``.pth`` read with
   ``torch.load(weights_only=True)``, or ``.safetensors``. A checkpoint dict that wraps the state
   dict as ``{"state_dict": ...}`` or ``{"model": ...}`` is accepted, and a ``module.`` prefix
   (``DistributedDataParallel``) is stripped.
3. **A whole pickled** ``nn.Module`` (``torch.save(model)``): unpickling can run arbitrary code, so
   it is refused with :class:`~ttcompress.errors.UnsafePickleError` unless ``trust_pickle=True``.
   ``weights_only=False`` is used on that trust_pickle path only.

The kind of a file is found from its content (magic bytes), not from its extension.

Checkpoint format (``format = "ttcompress"``, ``version = 1``)
---------------------------------------------------------------
When the model's architecture is rebuildable (``meta["arch"]`` is set, e.g. a built-in name,
``torchvision:resnet18`` or ``package.module:callable``), the checkpoint is a **safetensors** file:
the tensors are the model's state dict (one copy of each tied/shared tensor) and the safetensors
metadata has two string entries, ``"format": "ttcompress"`` and ``"ttcompress"``: a JSON header ::

    {"format": "ttcompress", "version": 1, "ttcompress_version": "0.1.0", "torch_version": "...",
     "arch": {"name": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
     "layers": {"fc": {"format": "tt", "config": {...TTLinear.config()...},
                       "rel_error": 0.12, "seconds": 0.01,
                       "params_before": 5130, "params_after": 1210}, ...},
     "info": {...free-form JSON...},
     "tied": {"duplicate.key": "kept.key", ...}}

Loading rebuilds it without unpickling anything: ``build_arch(arch)`` → every recorded layer is
replaced by ``LAYER_TYPES[format](**config)`` (structure only, no decomposition) →
``load_state_dict(strict=True)``.

When the model is not rebuildable (``meta["arch"] is None``, e.g. its base was a pickled module),
:func:`save` falls back to ``torch.save({"format": "ttcompress", "version": 1, "header": {...},
"model": model})``; loading such a file needs ``trust_pickle=True`` like any pickled module.

Every model that this module returns carries ``model.ttcompress_meta`` (see :func:`get_meta`) and
is in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io as _io
import json
import os
import pickle
import pickletools
import signal
import struct
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import nn

from ttcompress._version import __version__
from ttcompress.errors import CheckpointError, UnsafePickleError
from ttcompress.layers import LAYER_TYPES

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LoadedCheckpoint",
    "atomic_write",
    "build_model",
    "get_meta",
    "load",
    "load_checkpoint",
    "read_header",
    "save",
    "update_meta",
]

CHECKPOINT_FORMAT = "ttcompress"
CHECKPOINT_VERSION = 1
META_ATTR = "ttcompress_meta"

_MISSING: Any = object()

PathLike = str | os.PathLike[str]
InputKind = Literal["ttcompress", "ttcompress-pickle", "state_dict", "pickle"]


# --------------------------------------------------------------------------------------------------
# Model metadata
# --------------------------------------------------------------------------------------------------
def _default_meta() -> dict[str, Any]:
    return {"arch": None, "layers": {}, "info": {}}


def get_meta(model: nn.Module) -> dict[str, Any]:
    """Return a deep copy of ``model.ttcompress_meta``, with defaults filled in.

    Parameters
    ----------
    model : nn.Module
        Any module; one without metadata gives ``{"arch": None, "layers": {}, "info": {}}``.

    Returns
    -------
    dict
        ``{"arch": {"name": str, "kwargs": dict} | None, "layers": {name: record}, "info": dict}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    meta = _default_meta()
    stored = getattr(model, META_ATTR, None)
    if isinstance(stored, Mapping):
        meta.update(copy.deepcopy(dict(stored)))
        meta["layers"] = dict(meta.get("layers") or {})
        meta["info"] = dict(meta.get("info") or {})
    return meta


def update_meta(
    model: nn.Module,
    *,
    arch: Mapping[str, Any] | None = _MISSING,
    layers: Mapping[str, Mapping[str, Any]] | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Update ``model.ttcompress_meta`` in place and return a copy of the result.

    Parameters
    ----------
    model : nn.Module
        The model to annotate.
    arch : dict or None, optional
        Replaces the architecture spec (``{"name": ..., "kwargs": {...}}``); ``None`` marks the
        model as not rebuildable. Left unchanged when not given.
    layers : dict, optional
        Per-layer records merged into ``meta["layers"]`` (a record replaces one of the same name).
    info : dict, optional
        Free-form JSON entries merged into ``meta["info"]`` (shallow merge).

    Returns
    -------
    dict
        A deep copy of the updated metadata.
    """
    meta = get_meta(model)
    if arch is not _MISSING:
        if arch is not None:
            if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
                raise TypeError("arch must be a dict {'name': str, 'kwargs': dict} or None")
            arch = {"name": arch["name"], "kwargs": dict(arch.get("kwargs") or {})}
        meta["arch"] = copy.deepcopy(arch)
    if layers is not None:
        if not isinstance(layers, Mapping):
            raise TypeError("layers must be a mapping {qualified_name: record}")
        meta["layers"].update(copy.deepcopy({str(k): dict(v) for k, v in layers.items()}))
    if info is not None:
        if not isinstance(info, Mapping):
            raise TypeError("info must be a mapping")
        meta["info"].update(copy.deepcopy(dict(info)))
    # object.__setattr__ keeps nn.Module from treating the dict as anything special.
    object.__setattr__(model, META_ATTR, meta)
    return copy.deepcopy(meta)


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _umask_by_flipping() -> int:
    # Only where /proc is missing: os.umask can only be read by setting it, so do it once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _umask() -> int:
    """The process umask, read from ``/proc/self/status`` without changing it (else once, see above)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return _umask_by_flipping()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _remove_stale_temps(dest: Path) -> None:
    """Remove ``.NAME.PID.*.tmp`` files left beside ``dest`` by a writer that died (SIGKILL, power loss).

    A temp file whose PID is a live process other than this one may be a concurrent write and
    is left alone; names without a PID (older ttcompress) are stale by now.
    """
    prefix, me = f".{dest.name}.", os.getpid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(".tmp")) or not entry.is_file(follow_symlinks=False):
                continue
            pid_text = name[len(prefix) :].split(".", 1)[0]
            if pid_text.isdigit() and (int(pid_text) == me or _pid_alive(int(pid_text))):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


class _Terminated(SystemExit):
    """SIGTERM arrived during :func:`atomic_write`: unwind (removing the temp file), then exit 143."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`_Terminated` in the main thread instead of killing at once.

    A Python handler already installed is kept (it is called); an ignored SIGTERM stays ignored.
    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN or previous is None:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    If the ``with`` block raises, or SIGTERM arrives (it then ends the process with exit code
    143 once the temporary file is removed), nothing is written at ``path``: an existing file
    there stays as it was and the temporary file ``.NAME.PID.*.tmp`` is removed. One left by a
    process that could not clean up (SIGKILL) is removed by the next write to ``path``.
    Missing parent directories are created. The file gets the mode ``0o666 & ~umask``; the
    umask is read without changing it.

    Parameters
    ----------
    path : str or PathLike
        Destination file.
    mode : {"wb", "w"}
        Binary or text mode.
    encoding : str, optional
        Text encoding for ``mode="w"`` (default UTF-8).

    Yields
    ------
    file object
        Write to it; do not close it yourself.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    dest = Path(path)
    if dest.is_dir():
        raise IsADirectoryError(f"output path is a directory: {dest}")
    blocker = next((p for p in dest.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"cannot write {dest}: {blocker} is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    with _sigterm_unwinds():
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            if "b" in mode:
                handle: IO[Any] = os.fdopen(fd, "wb")
            else:
                handle = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
            fd = -1  # owned (and closed) by ``handle`` from here on
            with handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, dest)
        except BaseException:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible on every platform)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------------------------------
# Architectures and layer types
# --------------------------------------------------------------------------------------------------
def build_model(name: str, *, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an architecture by name; same as :func:`ttcompress.models.build_arch`.

    Parameters
    ----------
    name : str
        Built-in name, ``torchvision:NAME`` or ``package.module:callable``.
    kwargs : dict, optional
        Constructor arguments (JSON-serializable, they are recorded in the checkpoint).
    """
    from ttcompress.models import build_arch

    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"arch_kwargs must be a dict, got {type(kwargs).__name__}")
    return build_arch(name, kwargs=kwargs)


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` found in a file.

    Attributes
    ----------
    model : nn.Module
        The model (eval mode, with ``ttcompress_meta``).
    kind : {"ttcompress", "ttcompress-pickle", "state_dict", "pickle"}
        The input form.
    path : Path
        The file read.
    header : dict
        The ttcompress header for own checkpoints, else ``{}``.
    """

    model: nn.Module
    kind: InputKind
    path: Path
    header: dict[str, Any] = field(default_factory=dict)


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model file not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"model path is a directory, not a file: {p}")
    try:
        size = p.stat().st_size
        with p.open("rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"{p} is empty")
    return p


def _is_safetensors(p: Path) -> bool:
    with p.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= p.stat().st_size


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"{p} is not a readable safetensors file (corrupted?): {_short(exc)}") from None
    return tensors, metadata


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_valid_pickle(p: Path) -> bool:
    """True if ``p`` holds a parseable pickle (raw or inside a torch zip) — parsed, never executed."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return False
                data = zf.read(names[0])
        else:
            data = p.read_bytes()
        for _ in pickletools.genops(_io.BytesIO(data)):
            pass
        return True
    except Exception:
        return False


def _unsafe_message(p: Path) -> str:
    return (
        f"{p} contains a pickled Python object (for example a whole nn.Module saved with "
        "torch.save(model)); loading it can run arbitrary code, so it is refused. If you trust "
        "the file's source, pass --trust-pickle (Python: trust_pickle=True); otherwise save a "
        "state dict and load it with --arch"
    )


def _torch_load_safe(p: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if _is_valid_pickle(p):
            raise UnsafePickleError(_unsafe_message(p)) from None
        raise CheckpointError(f"{p} is not a readable model file (corrupted or unknown format)") from None
    except Exception as exc:
        raise CheckpointError(f"{p} is not a readable model file (corrupted?): {_short(exc, 100)}") from None


def _torch_load_trusted(p: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=False)  # only with trust_pickle=True
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {p} (corrupted, or a class it needs is not importable): {_short(exc)}") from None


def _extract_state_dict(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p} does not hold a state dict of tensors (entry {bad[0]!r} is not a tensor)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with one concise line for every kind of mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {list(sd[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f", ... (+{len(items) - 3})" if len(items) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s) (file vs model): {few(wrong)}")
    if problems:
        raise CheckpointError(f"state dict does not fit {what}: " + "; ".join(problems))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"state dict does not fit {what}: {_short(exc)}") from None


def _rebuild(header: Mapping[str, Any], tensors: dict[str, torch.Tensor], p: Path) -> nn.Module:
    arch = header.get("arch")
    if not isinstance(arch, Mapping) or not arch.get("name"):
        raise CheckpointError(f"{p}: ttcompress header has no architecture to rebuild")
    model = build_model(str(arch["name"]), kwargs=arch.get("kwargs") or {})
    layer_types = LAYER_TYPES
    layers = dict(header.get("layers") or {})
    # A module reachable under several names (shared) is replaced by one new instance.
    by_id: dict[int, nn.Module] = {}
    from ttcompress.surgery import get_submodule, set_submodule  # local: surgery imports io

    for name, record in layers.items():
        fmt = record.get("format")
        if fmt not in layer_types:
            raise CheckpointError(f"{p}: layer {name!r} has unknown format {fmt!r}")
        try:
            old = get_submodule(model, name)
        except (AttributeError, ValueError):
            raise CheckpointError(f"{p}: layer {name!r} does not exist in arch {arch['name']!r}") from None
        new = by_id.get(id(old))
        if new is None:
            try:
                new = layer_types[fmt](**dict(record.get("config") or {}))
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{p}: cannot rebuild layer {name!r}: {_short(exc)}") from None
            if hasattr(new, "rel_error"):
                with contextlib.suppress(AttributeError):
                    new.rel_error = record.get("rel_error")
            by_id[id(old)] = new
        model = set_submodule(model, name, new)
    for dup, kept in dict(header.get("tied") or {}).items():
        if kept in tensors:
            tensors[dup] = tensors[kept]
    _fit_state_dict(model, tensors, what=f"arch {arch['name']!r} (file {p})")
    object.__setattr__(
        model,
        META_ATTR,
        {"arch": {"name": arch["name"], "kwargs": dict(arch.get("kwargs") or {})}, "layers": layers,
         "info": dict(header.get("info") or {})},
    )
    return model


def read_header(path: PathLike) -> dict[str, Any] | None:
    """Return the ttcompress header of a safetensors checkpoint without loading its tensors.

    Returns ``None`` for any other kind of file (including the pickle fallback, whose header can
    only be read by unpickling).
    """
    p = _check_file(path)
    if not _is_safetensors(p):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{p} is not a readable safetensors file (corrupted?): {_short(exc)}") from None
    return _parse_header(metadata, p)


def _parse_header(metadata: Mapping[str, str], p: Path) -> dict[str, Any] | None:
    if metadata.get("format") != CHECKPOINT_FORMAT or CHECKPOINT_FORMAT not in metadata:
        return None
    try:
        header = json.loads(metadata[CHECKPOINT_FORMAT])
    except json.JSONDecodeError:
        raise CheckpointError(f"{p}: corrupted ttcompress header (invalid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupted ttcompress header")
    version = header.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {version!r} is newer than this ttcompress "
            f"({__version__}) supports ({CHECKPOINT_VERSION}); upgrade ttcompress"
        )
    return header


def load_checkpoint(
    path: PathLike,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load a model from any accepted input form and say which form it was.

    Parameters
    ----------
    path : str or PathLike
        The model file.
    trust_pickle : bool, default False
        Trust the file: allow unpickling arbitrary objects (``torch.load(weights_only=False)``). Needed for whole
        pickled modules only; never needed for ttcompress checkpoints of rebuildable models.
    arch : str, optional
        Architecture for a bare state dict (built-in name, ``torchvision:NAME`` or
        ``package.module:callable``). Ignored if equal to the one a ttcompress checkpoint records;
        a different one is an error.
    arch_kwargs : dict, optional
        Constructor arguments for ``arch``.

    Returns
    -------
    LoadedCheckpoint

    Raises
    ------
    CheckpointError
        Missing, unreadable or corrupted file; state dict without ``arch``; state dict that does
        not fit the architecture (missing/unexpected keys, wrong shapes).
    UnsafePickleError
        The file holds pickled objects and ``trust_pickle`` is False.
    ValueError
        Unknown ``arch`` or ``arch_kwargs`` it does not accept.
    """
    if not isinstance(trust_pickle, bool):
        raise TypeError("trust_pickle must be a bool")
    if arch_kwargs is not None and arch is None:
        raise ValueError("arch_kwargs given without arch")
    p = _check_file(path)
    model: nn.Module
    if _is_safetensors(p):
        tensors, metadata = _read_safetensors(p)
        header = _parse_header(metadata, p)
        if header is not None:
            _check_arch_conflict(header, arch, arch_kwargs, p)
            model = _rebuild(header, tensors, p)
            return LoadedCheckpoint(model.eval(), "ttcompress", p, header)
        return LoadedCheckpoint(_from_state_dict(tensors, p, arch, arch_kwargs), "state_dict", p, {})

    if not trust_pickle:
        obj = _torch_load_safe(p)
        if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never yields modules
            raise UnsafePickleError(_unsafe_message(p))
        sd = _extract_state_dict(obj, p)
        return LoadedCheckpoint(_from_state_dict(sd, p, arch, arch_kwargs), "state_dict", p, {})

    obj = _torch_load_trusted(p)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT and isinstance(obj.get("model"), nn.Module):
        header = dict(obj.get("header") or {})
        model = obj["model"]
        object.__setattr__(
            model,
            META_ATTR,
            {"arch": None, "layers": dict(header.get("layers") or {}), "info": dict(header.get("info") or {})},
        )
        return LoadedCheckpoint(model.eval(), "ttcompress-pickle", p, header)
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise ValueError(f"{p} holds a whole pickled module; do not pass arch ({arch!r}) with it")
        update_meta(obj, info={})  # fills the defaults; keeps the meta of a pickled ttcompress model
        return LoadedCheckpoint(obj.eval(), "pickle", p, {})
    sd = _extract_state_dict(obj, p)
    return LoadedCheckpoint(_from_state_dict(sd, p, arch, arch_kwargs), "state_dict", p, {})


def _check_arch_conflict(
    header: Mapping[str, Any], arch: str | None, arch_kwargs: Mapping[str, Any] | None, p: Path
) -> None:
    if arch is None:
        return
    recorded = header.get("arch") or {}
    if recorded.get("name") != arch or (
        arch_kwargs is not None and dict(arch_kwargs) != dict(recorded.get("kwargs") or {})
    ):
        raise ValueError(
            f"{p} is a ttcompress checkpoint of arch {recorded.get('name')!r} "
            f"{json.dumps(recorded.get('kwargs') or {})}; drop --arch/--arch-kwargs (it is self-describing)"
        )


def _from_state_dict(
    sd: dict[str, torch.Tensor], p: Path, arch: str | None, arch_kwargs: Mapping[str, Any] | None
) -> nn.Module:
    if arch is None:
        raise CheckpointError(
            f"{p} is a bare state dict; name its architecture with --arch (Python: arch=...), "
            "e.g. --arch torchvision:resnet18 --arch-kwargs '{\"num_classes\": 10}'"
        )
    model = build_model(arch, kwargs=arch_kwargs)
    _fit_state_dict(model, sd, what=f"arch {arch!r}" + (f" {json.dumps(dict(arch_kwargs))}" if arch_kwargs else ""))
    return model.eval()


def load(
    path: PathLike,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load a model from a ttcompress checkpoint, a state dict + ``arch``, or (trusted) a pickle.

    Parameters are those of :func:`load_checkpoint`. The model is returned in eval mode and carries
    ``model.ttcompress_meta``.

    Examples
    --------
    >>> model = load("model.tt.pt")                                  # doctest: +SKIP
    >>> model = load("weights.pth", arch="torchvision:resnet18",
    ...              arch_kwargs={"num_classes": 10})                # doctest: +SKIP
    """
    return load_checkpoint(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs).model


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
def _dedup_tensors(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One contiguous CPU copy per distinct tensor; identical views of one storage become ``tied``."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is not a tensor ({type(t).__name__}); cannot save it")
        t = t.detach()
        key = None
        if t.numel() > 0 and t.device.type != "meta":
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key is not None and key in seen:
            tied[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        # clone: safetensors refuses tensors that share memory (e.g. partially overlapping views)
        kept[name] = t.to("cpu").contiguous().clone()
    return kept, tied


def save(model: nn.Module, path: PathLike, *, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a self-describing ttcompress checkpoint, atomically.

    Parameters
    ----------
    model : nn.Module
        A model carrying ``ttcompress_meta`` (from :func:`load`, ``build_arch`` or
        :func:`ttcompress.compress`). With ``meta["arch"]`` set, the file is safetensors and loads
        without unpickling; with ``meta["arch"] is None`` (the base was a pickled module) it is a
        ``torch.save`` pickle that needs ``trust_pickle=True`` to load.
    path : str or PathLike
        Destination (conventionally ``*.tt.pt``). Written via :func:`atomic_write`.
    info : dict, optional
        JSON entries merged into the checkpoint's ``info`` (not into ``model``'s own metadata).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    meta = get_meta(model)
    if info is not None:
        if not isinstance(info, Mapping):
            raise TypeError("info must be a mapping")
        meta["info"].update(copy.deepcopy(dict(info)))
    header: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "ttcompress_version": __version__,
        "torch_version": torch.__version__,
        "arch": meta["arch"],
        "layers": meta["layers"],
        "info": meta["info"],
    }
    dest = Path(path)
    if meta["arch"] is None:
        with atomic_write(dest, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "header": header, "model": model}, f)
        return dest

    from safetensors.torch import save as st_save

    tensors, tied = _dedup_tensors(model.state_dict())
    header["tied"] = tied
    try:
        header_json = json.dumps(header, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model metadata (ttcompress_meta) is not JSON-serializable: {exc}") from None
    data = st_save(tensors, metadata={"format": CHECKPOINT_FORMAT, CHECKPOINT_FORMAT: header_json})
    with atomic_write(dest, "wb") as f:
        _write_bytes(f, data)
    return dest


def _write_bytes(f: IO[bytes], data: bytes) -> None:
    # Separate function so tests can simulate a failure in the middle of a write.
    f.write(data)
