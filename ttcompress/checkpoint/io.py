"""Load models in every accepted form; save and load ttcompress checkpoints.

Accepted inputs (:func:`load`)
------------------------------
1. **A ttcompress checkpoint** (written by :func:`save`): self-describing, loads with no flags.
2. **A state dict plus an architecture name** (``arch``): ``.pt``/``.pth`` read with
   ``torch.load(weights_only=True)``, or ``.safetensors``. A checkpoint dict that wraps the state
   dict as ``{"state_dict": ...}`` or ``{"model": ...}`` is accepted, and a ``module.`` prefix
   (``DistributedDataParallel``) is stripped.
3. **A Hugging Face model directory** (``config.json`` + ``model.safetensors``, as
   ``save_pretrained`` or :func:`ttcompress.checkpoint.hf.save_hf_dir` writes it): built from its config by
   :func:`ttcompress.checkpoint.hf.load_hf_dir`, offline, with no code from the directory run (``auto_map`` is
   refused) and the weights read without unpickling; a compressed one is rebuilt from the layers
   its ``ttcompress.json`` records. Its architecture is recorded as ``hf:CLASS`` with the config.
4. **A whole pickled** ``nn.Module`` (``torch.save(model)``): unpickling can run arbitrary code, so
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

Loading rebuilds it without unpickling anything (:mod:`ttcompress.checkpoint.rebuild`): ``build_arch(arch)``
→ every recorded layer is replaced by ``get_format(format).rebuild(config)`` (structure only, no
decomposition) → ``load_state_dict(strict=True)``.

When the architecture is not known (``meta["arch"] is None``: a model that was neither built by
name nor loaded from a file that names it, e.g. a pickled module or your own instance), :func:`save`
writes the same safetensors file with ``"arch": null``: the weights and the applied layers, never a
pickle. Loading it needs the dense model: ``load(path, arch=...)`` with an ``nn.Module`` instance
(a skeleton of the same architecture, copied, its weights ignored), a callable returning one, or a
name; the recorded layers are then put into it. Without ``arch`` that is an
:class:`~ttcompress.errors.ArchRequiredError`. A transformers model of one of transformers' own
classes is always recorded (``hf:CLASS`` with its config).

Older files written by ``torch.save`` (``{"format": "ttcompress", "header": ..., "model": module}``)
still load with ``trust_pickle=True``.

Every model that this module returns carries ``model.ttcompress_meta`` (see
:func:`ttcompress.checkpoint.meta.get_meta`) and is in eval mode. :func:`get_meta`, :func:`update_meta`
(:mod:`ttcompress.checkpoint.meta`) and :func:`atomic_write` (:mod:`ttcompress.fsutil`) are re-exported here.
"""

from __future__ import annotations

import copy
import functools
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
from typing import IO, Any, Callable, Literal

import torch
from torch import nn

from ttcompress._version import __version__
from ttcompress.errors import ArchRequiredError, CheckpointError, UnsafePickleError, short_error
from ttcompress.checkpoint.header import parse_header_json, validate_header
from ttcompress.checkpoint.dtypes import cast_inputs_to_model
from ttcompress.fsutil import PathLike, atomic_write
from ttcompress.checkpoint.hf import load_hf_dir, recorded_hf_arch
from ttcompress.checkpoint.hf_files import is_hf_dir, read_record
from ttcompress.checkpoint.meta import ArchSpec, ModelMeta, get_meta, read_meta, set_meta, update_meta
from ttcompress.checkpoint.models import build_arch, list_archs
from ttcompress.checkpoint.rebuild import Skeleton, fit_state_dict, rebuild_model, skeleton_factory

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "ArchLike",
    "LoadedCheckpoint",
    "atomic_write",
    "build_model",
    "get_meta",
    "is_model_path",
    "load",
    "load_checkpoint",
    "read_header",
    "save",
    "update_meta",
]

CHECKPOINT_FORMAT = "ttcompress"
CHECKPOINT_VERSION = 1
#: Extensions of the model files an ``arch`` string may name (see :func:`is_model_path`).
MODEL_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")

InputKind = Literal["ttcompress", "ttcompress-pickle", "state_dict", "pickle", "hf_dir"]
#: What ``arch`` may be: a name, a dense module (the skeleton) or a callable returning one.
ArchLike = str | nn.Module | Callable[..., nn.Module]


def build_model(name: str, *, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an architecture by name; same as :func:`ttcompress.checkpoint.models.build_arch`.

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
    kind : {"ttcompress", "ttcompress-pickle", "state_dict", "pickle", "hf_dir"}
        The input form.
    path : Path
        The file (or Hugging Face directory) read.
    header : dict
        The ttcompress header for own checkpoints, the ``ttcompress.json`` record of a
        Hugging Face directory, else ``{}``.
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
        raise CheckpointError(f"model path is a directory, not a file or a Hugging Face model directory: {p}")
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


def _refuse_torchscript(p: Path) -> None:
    """A TorchScript archive (``torch.jit.save``) is a compiled program, not a model ttcompress can
    rewrite: say so, instead of "not readable" (or, with trust, a model with no layers)."""
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(
            f"{p} is a TorchScript archive (torch.jit.save), which ttcompress cannot rewrite; save the eager "
            "model's state dict (torch.save(model.state_dict(), ...)) and pass --arch, or the module itself"
        )


def _torch_load_safe(p: Path) -> Any:
    _refuse_torchscript(p)
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
    _refuse_torchscript(p)
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
    arch: ArchLike | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
) -> LoadedCheckpoint:
    """Load a model from any accepted input form and say which form it was.

    Parameters
    ----------
    path : str or PathLike
        The model file, or a Hugging Face model directory.
    trust_pickle : bool, default False
        Trust the file: allow unpickling arbitrary objects (``torch.load(weights_only=False)``). Needed for whole
        pickled modules only; never needed for ttcompress checkpoints of rebuildable models.
    arch : str, nn.Module or callable, optional
        The architecture, for a bare state dict or a checkpoint that records none. A name
        (built-in, ``torchvision:NAME``, ``hf:CLASS`` or ``package.module:callable``); a name
        different from the one a checkpoint records is an error. Or a dense ``nn.Module``
        instance (a skeleton: it is copied, its weights are replaced) or a callable returning
        one: for a checkpoint, the recorded layers are put into it and nothing named in the file
        is imported. A string that is the path of a model file or directory
        (:func:`is_model_path`) is loaded (with the same trust options) and used as that instance.
        Not accepted with a Hugging Face directory (self-describing).
    arch_kwargs : dict, optional
        Keyword arguments for a name or a callable ``arch``.
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
        not fit the architecture (missing/unexpected keys, wrong shapes); a Hugging Face directory
        without ``config.json`` or weights, or whose config names custom code (``auto_map``).
    ArchRequiredError
        A checkpoint that records no architecture, and no ``arch``.
    UnsafePickleError
        The file holds pickled objects and ``trust_pickle`` is False.
    UntrustedCodeError
        The header names an import path that ``arch`` does not name and ``trust_code`` is False.
    ValueError
        Unknown ``arch`` or ``arch_kwargs`` it does not accept.
    """
    _check_load_options(trust_pickle=trust_pickle, trust_code=trust_code, arch=arch, arch_kwargs=arch_kwargs)
    if isinstance(arch, str) and is_model_path(arch):
        if arch_kwargs is not None:
            raise ValueError(f"arch_kwargs cannot be given with a model file as arch ({arch})")
        arch = load(arch, trust_pickle=trust_pickle, trust_code=trust_code)
    skeleton = skeleton_factory(arch, arch_kwargs)
    if Path(path).is_dir():
        return _load_hf(Path(path), arch=arch, trust_pickle=trust_pickle)
    p = _check_file(path)
    if _is_safetensors(p):
        return _load_safetensors(p, arch, arch_kwargs, skeleton, trust_code=trust_code)
    if not trust_pickle:
        obj = _torch_load_safe(p)
        if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never yields modules
            raise UnsafePickleError(_unsafe_message(p))
        sd = _extract_state_dict(obj, p)
        return LoadedCheckpoint(_from_state_dict(sd, p, arch, arch_kwargs), "state_dict", p, {})

    return _load_trusted_pickle(p, arch, arch_kwargs)


def _check_load_options(*, trust_pickle: Any, trust_code: Any, arch: Any, arch_kwargs: Any) -> None:
    """The types of :func:`load_checkpoint`'s options, and ``arch_kwargs`` only with ``arch``."""
    if not isinstance(trust_pickle, bool):
        raise TypeError("trust_pickle must be a bool")
    if not isinstance(trust_code, bool):
        raise TypeError("trust_code must be a bool")
    if arch_kwargs is not None and arch is None:
        raise ValueError("arch_kwargs given without arch")
    if arch_kwargs is not None and not isinstance(arch_kwargs, Mapping):
        raise TypeError(f"arch_kwargs must be a dict, got {type(arch_kwargs).__name__}")


def _load_safetensors(
    p: Path, arch: Any, arch_kwargs: Mapping[str, Any] | None, skeleton: Skeleton | None, *, trust_code: bool
) -> LoadedCheckpoint:
    """A ttcompress checkpoint (rebuilt from its header) or a bare safetensors state dict."""
    tensors, metadata = _read_safetensors(p)
    header = _parse_header(metadata, p)
    if header is None:
        return LoadedCheckpoint(_from_state_dict(tensors, p, arch, arch_kwargs), "state_dict", p, {})
    if isinstance(arch, str):
        _check_arch_conflict(header, arch, arch_kwargs, p)
        if header.get("arch") is None:  # the name the caller gave builds it
            skeleton = functools.partial(build_model, arch, kwargs=arch_kwargs)
    model = rebuild_model(header, tensors, p, user_arch=arch if isinstance(arch, str) else None,
                          trust_code=trust_code, skeleton=skeleton, user_spec=_spec_of(arch, arch_kwargs))
    return LoadedCheckpoint(cast_inputs_to_model(model.eval()), "ttcompress", p, header)


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


def is_model_path(arch: str) -> bool:
    """Whether an ``arch`` string names a model file or directory (the dense model) rather than an architecture.

    A path is an existing file with a model extension (``.pt``, ``.pth``, ``.safetensors``,
    ``.bin``) or a Hugging Face directory; built-in names and ``NAME:...`` forms never are.
    """
    if ":" in arch or arch.strip().lower() in list_archs():
        return False
    p = Path(arch)
    return (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES) or is_hf_dir(p)


def _load_hf(d: Path, *, arch: ArchLike | None, trust_pickle: bool) -> LoadedCheckpoint:
    if arch is not None:
        raise ValueError(f"{d} is a Hugging Face model directory, built from its config.json; do not pass arch")
    model = load_hf_dir(d, trust_pickle=trust_pickle)
    return LoadedCheckpoint(model, "hf_dir", d, read_record(d))


def _spec_of(arch: ArchLike | None, arch_kwargs: Mapping[str, Any] | None) -> ArchSpec | None:
    """What to record for a user-given ``arch``: a name is recorded as is; a module or a callable only
    when it is a transformers model (its ``hf:`` record) or carries a recorded architecture itself."""
    if isinstance(arch, str):
        return ArchSpec(arch, dict(arch_kwargs or {}))
    if not isinstance(arch, nn.Module):
        return None
    spec = read_meta(arch).arch
    if spec is not None:
        return spec
    recorded = recorded_hf_arch(arch)
    return None if recorded is None else ArchSpec.from_dict(recorded)


def _check_arch_conflict(
    header: Mapping[str, Any], arch: str, arch_kwargs: Mapping[str, Any] | None, p: Path
) -> None:
    recorded = header.get("arch")
    if recorded is None:  # the file records no architecture: the name given builds it
        return
    if recorded.get("name") != arch or (
        arch_kwargs is not None and dict(arch_kwargs) != dict(recorded.get("kwargs") or {})
    ):
        raise ValueError(
            f"{p} is a ttcompress checkpoint of arch {recorded.get('name')!r} "
            f"{json.dumps(recorded.get('kwargs') or {})}; drop --arch/--arch-kwargs (it is self-describing)"
        )


def _from_state_dict(
    sd: dict[str, torch.Tensor], p: Path, arch: ArchLike | None, arch_kwargs: Mapping[str, Any] | None
) -> nn.Module:
    if arch is None:
        raise ArchRequiredError(
            f"{p} is a bare state dict; name its architecture with --arch (Python: arch=...), "
            "e.g. --arch torchvision:resnet18 --arch-kwargs '{\"num_classes\": 10}'"
        )
    if isinstance(arch, str):
        model = build_model(arch, kwargs=arch_kwargs)
        what = f"arch {arch!r}" + (f" {json.dumps(dict(arch_kwargs))}" if arch_kwargs else "")
    else:
        factory = skeleton_factory(arch, arch_kwargs)
        model, what = factory(), "the given arch"  # type: ignore[misc]
        spec = _spec_of(arch, arch_kwargs)
        update_meta(model, arch=None if spec is None else spec.to_dict())
    fit_state_dict(model, sd, what=what)
    return model.eval()


def load(
    path: PathLike,
    *,
    trust_pickle: bool = False,
    arch: ArchLike | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
) -> nn.Module:
    """Load a model from a ttcompress checkpoint, a Hugging Face directory, a state dict + ``arch``, or
    (trusted) a pickle.

    Parameters are those of :func:`load_checkpoint`. The model is returned in eval mode and carries
    ``model.ttcompress_meta``.

    Examples
    --------
    >>> model = load("model.tt.pt")                                  # doctest: +SKIP
    >>> model = load("weights.pth", arch="torchvision:resnet18",
    ...              arch_kwargs={"num_classes": 10})                # doctest: +SKIP
    >>> model = load("./my-model-dir")                               # doctest: +SKIP
    >>> model = load("mine.tt.pt", arch=MyNet())  # a file saved from a model of unknown arch  # doctest: +SKIP
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
        Any model, usually carrying ``ttcompress_meta`` (from :func:`load`, ``build_arch`` or
        :func:`ttcompress.compress`). The file is always safetensors and never a pickle. It records
        the architecture when it is known (``meta["arch"]``, or the ``hf:`` record of a
        transformers model); otherwise the weights and the applied layers only, and
        ``load(path, arch=...)`` needs the dense model.
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
    if meta["arch"] is None:
        meta["arch"] = recorded_hf_arch(model)
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
    if dest.is_dir():
        raise ValueError(f"path {dest} is a directory; save writes one file (a Hugging Face directory is "
                         "written by ttcompress.save_hf_dir)")
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
