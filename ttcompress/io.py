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
     "layers": {"fc": {"format": NAME, "config": {...the layer's config()...},
                       "rel_error": 0.12, "seconds": 0.01,
                       "params_before": 5130, "params_after": 1210}, ...},
     "info": {...free-form JSON...},
     "tied": {"duplicate.key": "kept.key", ...}}

Loading rebuilds it without unpickling anything (:mod:`ttcompress.rebuild`): ``build_arch(arch)``
→ every recorded layer is replaced by ``get_format(format).rebuild(config)`` (structure only, no
decomposition) → ``load_state_dict(strict=True)``.

When the model is not rebuildable (``meta["arch"] is None``, e.g. its base was a pickled module),
:func:`save` falls back to ``torch.save({"format": "ttcompress", "version": 1, "header": {...},
"model": model})``; loading such a file needs ``trust_pickle=True`` like any pickled module.

Every model that this module returns carries ``model.ttcompress_meta`` (see
:func:`ttcompress.meta.get_meta`) and is in eval mode. :func:`get_meta`, :func:`update_meta`
(:mod:`ttcompress.meta`) and :func:`atomic_write` (:mod:`ttcompress.fsutil`) are re-exported here.
"""

from __future__ import annotations

import copy
import io as _io
import json
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import nn

from ttcompress._version import __version__
from ttcompress.errors import CheckpointError, UnsafePickleError
from ttcompress.header import parse_header_json, validate_header
from ttcompress.fsutil import PathLike, atomic_write
from ttcompress.meta import ModelMeta, get_meta, set_meta, update_meta
from ttcompress.models import build_arch
from ttcompress.rebuild import fit_state_dict, rebuild_model, short_error

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

InputKind = Literal["ttcompress", "ttcompress-pickle", "state_dict", "pickle"]


def build_model(name: str, *, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an architecture by name; same as :func:`ttcompress.models.build_arch`.

    Parameters
    ----------
    name : str
        Built-in name, ``torchvision:NAME`` or ``package.module:callable``.
    kwargs : dict, optional
        Constructor arguments (JSON-serializable, they are recorded in the checkpoint).
    """
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
        raise CheckpointError(f"{p} is not a readable safetensors file (corrupted?): {short_error(exc)}") from None
    return tensors, metadata


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
        raise CheckpointError(f"{p} is not a readable model file (corrupted?): {short_error(exc, 100)}") from None


def _torch_load_trusted(p: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=False)  # only with trust_pickle=True
    except Exception as exc:
        raise CheckpointError(f"cannot unpickle {p} (corrupted, or a class it needs is not importable): {short_error(exc)}") from None


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
        raise CheckpointError(f"{p} is not a readable safetensors file (corrupted?): {short_error(exc)}") from None
    return _parse_header(metadata, p)


def _parse_header(metadata: Mapping[str, str], p: Path) -> dict[str, Any] | None:
    if metadata.get("format") != CHECKPOINT_FORMAT or CHECKPOINT_FORMAT not in metadata:
        return None
    header = parse_header_json(metadata[CHECKPOINT_FORMAT], source=str(p))
    validate_header(header, source=str(p), max_version=CHECKPOINT_VERSION)
    return header


def load_checkpoint(
    path: PathLike,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
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
    trust_code : bool, default False
        Allow a checkpoint header to name an import path (``package.module:callable``) as its
        architecture; that code is imported and called. Without it only built-in names,
        ``torchvision:NAME`` and the import path given as ``arch`` are accepted from a header.

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
    UntrustedCodeError
        The header names an import path that ``arch`` does not name and ``trust_code`` is False.
    ValueError
        Unknown ``arch`` or ``arch_kwargs`` it does not accept.
    """
    if not isinstance(trust_pickle, bool):
        raise TypeError("trust_pickle must be a bool")
    if not isinstance(trust_code, bool):
        raise TypeError("trust_code must be a bool")
    if arch_kwargs is not None and arch is None:
        raise ValueError("arch_kwargs given without arch")
    p = _check_file(path)
    model: nn.Module
    if _is_safetensors(p):
        tensors, metadata = _read_safetensors(p)
        header = _parse_header(metadata, p)
        if header is not None:
            _check_arch_conflict(header, arch, arch_kwargs, p)
            model = rebuild_model(header, tensors, p, user_arch=arch, trust_code=trust_code)
            return LoadedCheckpoint(model.eval(), "ttcompress", p, header)
        return LoadedCheckpoint(_from_state_dict(tensors, p, arch, arch_kwargs), "state_dict", p, {})

    if not trust_pickle:
        obj = _torch_load_safe(p)
        if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never yields modules
            raise UnsafePickleError(_unsafe_message(p))
        sd = _extract_state_dict(obj, p)
        return LoadedCheckpoint(_from_state_dict(sd, p, arch, arch_kwargs), "state_dict", p, {})

    return _load_trusted_pickle(p, arch, arch_kwargs)


def _load_trusted_pickle(p: Path, arch: str | None, arch_kwargs: Mapping[str, Any] | None) -> LoadedCheckpoint:
    """A pickled file the user trusts: a ttcompress pickle checkpoint, a whole module, or a state dict."""
    obj = _torch_load_trusted(p)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT and isinstance(obj.get("model"), nn.Module):
        header = dict(obj.get("header") or {})
        model = obj["model"]
        set_meta(model, ModelMeta.from_dict({"layers": header.get("layers"), "info": header.get("info")}))
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
    fit_state_dict(model, sd, what=f"arch {arch!r}" + (f" {json.dumps(dict(arch_kwargs))}" if arch_kwargs else ""))
    return model.eval()


def load(
    path: PathLike,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
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
    return load_checkpoint(
        path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs, trust_code=trust_code
    ).model


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
