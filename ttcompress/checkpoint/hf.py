"""Hugging Face model directories, offline: read, rebuild and write them without running their code.

A directory as ``save_pretrained(..., safe_serialization=True)`` writes it (``config.json`` plus
``model.safetensors``, or a sharded ``model.safetensors.index.json`` and its shards) is a model
input. :func:`load_hf_dir` builds the model from its config with ``transformers`` and loads the
weights from safetensors only:

* nothing is downloaded, and no code from the directory runs: a config that names custom code
  (``auto_map``) is refused, and the model class is chosen among ``transformers``' own classes
  registered for the config's ``model_type`` (``config.architectures[0]`` when it is one of them,
  else ``AutoModel``'s class);
* every size in ``config.json`` is checked against the tensor shapes in the safetensors headers on
  a skeleton built on the ``meta`` device, before anything is allocated;
* ``pytorch_model.bin`` (a pickle) is refused unless ``trust_pickle=True``;
* the weights load strictly: a missing, unexpected or wrongly shaped tensor is a one-line
  :class:`~ttcompress.errors.CheckpointError`. Tied parameters (an output layer sharing the
  embedding matrix) may be stored once, as ``save_pretrained`` does.

:func:`save_hf_dir` writes a model back in the same layout, atomically, with a ``ttcompress.json``
beside it that records the factorized layers (format and ``config()``), the plan and the
architecture, so that a compressed model round-trips through :func:`load_hf_dir`.

The returned models carry ``ttcompress_meta`` whose architecture record,
``{"name": "hf:<ModelClass>", "kwargs": {"config": {...}}}``, rebuilds the skeleton without the
directory through :func:`build_hf_model` (``build_hf_model(class_name, **kwargs)``).

GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D`` (a Linear with a transposed
weight); :func:`linearize_conv1d` turns them into ``nn.Linear`` so Linear compression applies.

``transformers`` is an optional dependency (``pip install 'ttcompress[hf]'``), imported on first use.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ttcompress._version import __version__
from ttcompress.errors import CheckpointError, short_error
from ttcompress.fsutil import atomic_dir
from ttcompress.checkpoint.hf_files import (
    COMPRESSED_WEIGHTS_FILE,
    CONFIG_FILE,
    RECORD_FILE,
    RECORD_FORMAT,
    RECORD_VERSION,
    WEIGHTS_FILE,
    PathLike,
    check_fit,
    copy_weights,
    identity_groups,
    is_hf_dir,
    key_map,
    open_weights,
    read_json,
    read_record,
    state_groups,
)
from ttcompress.checkpoint.header import check_layer_counts
from ttcompress.checkpoint.layer_records import apply_layer_records
from ttcompress.modtree import set_submodule
from ttcompress.checkpoint.meta import ModelMeta, get_meta, set_meta
from ttcompress.checkpoint.hf_config import MAX_LABELS, check_config_values, label_bound
from ttcompress.checkpoint.hf_remote import CONFIG_KEY, MODELING_FILE, base_config, modeling_source, remote_config
from ttcompress.layers import LAYER_TYPES
from ttcompress.compression.plan import Plan

__all__ = [
    "CONFIG_FILE",
    "HF_ARCH_PREFIX",
    "CompressedModelMixin",
    "RECORD_FILE",
    "WEIGHTS_FILE",
    "build_hf_model",
    "conv1d_to_linear",
    "restore_conv1d",
    "hf_arch",
    "is_conv1d",
    "is_hf_dir",
    "linearize_conv1d",
    "load_hf_dir",
    "recorded_hf_arch",
    "save_hf_dir",
    "tied_parameters",
]

HF_ARCH_PREFIX = "hf:"
#: transformers' ``variant`` of a compressed directory's weights file (``model.ttcompress.safetensors``).
COMPRESSED_VARIANT = "ttcompress"



# --------------------------------------------------------------------------------------------------
# transformers, configs and model classes
# --------------------------------------------------------------------------------------------------
def _transformers() -> ModuleType:
    """The ``transformers`` module, or a one-line error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "Hugging Face models need the optional package transformers: pip install 'ttcompress[hf]'"
        ) from None
    return transformers


def _find_key(data: Any, key: str) -> bool:
    """Whether ``key`` occurs as a dict key anywhere in nested JSON ``data``."""
    if isinstance(data, Mapping):
        return key in data or any(_find_key(v, key) for v in data.values())
    if isinstance(data, list):
        return any(_find_key(v, key) for v in data)
    return False


def _make_config(config: Mapping[str, Any], where: str, *, max_labels: int = MAX_LABELS) -> Any:
    """A ``transformers`` config object from a config dict, refusing anything that runs code.

    The config class comes from ``transformers.CONFIG_MAPPING[model_type]`` only; ``auto_map``
    (custom code) anywhere in the dict and an attention implementation taken from the hub
    (``"org/repo"``) are refused. The dict's values are checked against the class's declared
    fields first (:func:`ttcompress.checkpoint.hf_config.check_config_values`; at most ``max_labels``
    labels), and any exception transformers raises on them is one :class:`CheckpointError`.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where}: the config must be a JSON object, got {type(config).__name__}")
    if _find_key(config, "auto_map"):
        raise CheckpointError(f"{where}: the config names custom code (auto_map); refusing to run code from a model")
    for key in ("attn_implementation", "_attn_implementation"):
        if "/" in str(config.get(key) or ""):
            raise CheckpointError(f"{where}: {key} {config[key]!r} would fetch a kernel from the hub; refusing it")
    model_type = config.get("model_type")
    mapping = _transformers().CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise CheckpointError(f"{where}: unknown or missing model_type {model_type!r} (not a transformers model)")
    check_config_values(config, mapping[model_type], where, max_labels=max_labels)
    try:
        return mapping[model_type].from_dict(dict(config))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises on a file's values is one line
        raise CheckpointError(f"{where}: invalid config: {short_error(exc)}") from None


def _registered_class_names(model_type: str) -> set[str]:
    """Names of the model classes that transformers' auto mappings register for ``model_type``."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES"):
            value = getattr(modeling_auto, attr).get(model_type)
            names.update([value] if isinstance(value, str) else list(value or ()))
    return names


def _model_class(config: Any, class_name: str | None, *, where: str, strict: bool) -> type[nn.Module]:
    """The transformers class named ``class_name`` if it is registered for ``config``'s model type.

    Otherwise ``AutoModel``'s class for the config (``strict=False``) or a :class:`CheckpointError`.
    ``class_name`` is only looked up after it was found in transformers' own registry.
    """
    tf = _transformers()
    if isinstance(class_name, str) and class_name in _registered_class_names(config.model_type):
        cls = getattr(tf, class_name, None)
        if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel) and isinstance(config, cls.config_class):
            return cls
    if strict:
        raise CheckpointError(
            f"{where}: {class_name!r} is not a transformers model class for model_type {config.model_type!r}"
        )
    try:
        return tf.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise CheckpointError(f"{where}: transformers has no AutoModel for model_type {config.model_type!r}") from None


def _instantiate(cls: type[nn.Module], config: Any, *, device: str | None, where: str) -> nn.Module:
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            try:
                return cls(config)
            except ImportError as exc:  # an attention kernel this machine lacks (flash_attention_2, ...)
                wanted = getattr(config, "_attn_implementation", None)
                if wanted in (None, "sdpa", "eager"):
                    raise CheckpointError(f"{where}: cannot build {cls.__name__}: {short_error(exc)}") from None
                warnings.warn(f"{where}: attention {wanted!r} is not available here ({short_error(exc)}); "
                              "using PyTorch's scaled_dot_product_attention ('sdpa'), which computes the same",
                              stacklevel=2)
                config._attn_implementation = "sdpa"
                return cls(config)
    except (CheckpointError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the config's values make transformers raise is one line
        raise CheckpointError(f"{where}: cannot build {cls.__name__} from the config: {short_error(exc)}") from None


def _config_dict(config: Any) -> dict[str, Any]:
    """The complete config as plain JSON (what ``config.json`` holds)."""
    return json.loads(config.to_json_string(use_diff=False))


def hf_arch(model: nn.Module, *, conv1d_as_linear: bool = False) -> dict[str, Any]:
    """The architecture record of a transformers model: ``{"name": "hf:Class", "kwargs": {...}}``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of one of transformers' own classes.
    conv1d_as_linear : bool, optional
        Record that the model's ``Conv1D`` layers were replaced by ``nn.Linear``.

    Returns
    -------
    dict
        JSON-serializable; ``build_hf_model(name[3:], **kwargs)`` rebuilds the skeleton.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "to_json_string"):
        raise TypeError(f"model must be a transformers model (with .config), got {type(model).__name__}")
    kwargs: dict[str, Any] = {"config": _config_dict(config)}
    kwargs["config"]["architectures"] = [type(model).__name__]
    if conv1d_as_linear:
        kwargs["conv1d_as_linear"] = True
    return {"name": HF_ARCH_PREFIX + type(model).__name__, "kwargs": kwargs}


def recorded_hf_arch(model: nn.Module) -> dict[str, Any] | None:
    """The ``hf:`` architecture record of a model of one of transformers' own classes, else ``None``.

    Works for a model the user built directly (``GPT2LMHeadModel(config)``), with no
    ``ttcompress_meta``: whether its ``Conv1D`` layers were linearized is found by comparing it
    with a skeleton of its class built on the ``meta`` device. ``transformers`` is only imported
    when ``model``'s class comes from it.
    """
    if not type(model).__module__.startswith("transformers.") or not hasattr(getattr(model, "config", None),
                                                                               "to_json_string"):
        return None
    try:
        cls = _model_class(model.config, type(model).__name__, where="model", strict=True)
    except CheckpointError:
        return None
    return hf_arch(model, conv1d_as_linear=_conv1d_replaced(model, cls))


def _set_meta(model: nn.Module, arch: Mapping[str, Any], layers: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    set_meta(model, ModelMeta.from_dict({"arch": dict(arch), "layers": dict(layers), "info": dict(info)}))


def build_hf_model(
    class_name: str, config: Mapping[str, Any], *, conv1d_as_linear: bool = False, device: str | None = None
) -> nn.Module:
    """Build a transformers model skeleton (randomly initialized) from a recorded config.

    Parameters
    ----------
    class_name : str
        A transformers model class registered for ``config["model_type"]`` (e.g.
        ``"GPT2LMHeadModel"``); any other name is refused, nothing else is imported.
    config : dict
        The config as ``config.json`` holds it (``model_type`` plus the model's sizes).
    conv1d_as_linear : bool, optional
        Replace GPT-2 style ``Conv1D`` layers by ``nn.Linear`` (see :func:`linearize_conv1d`).
    device : str, optional
        ``"cpu"`` or ``"meta"`` (shapes only, nothing allocated); default: the current default
        device (so that a caller's ``with torch.device("meta")`` holds).

    Returns
    -------
    nn.Module
        In eval mode, carrying ``ttcompress_meta`` with the ``hf:`` architecture record.

    Raises
    ------
    CheckpointError
        transformers is absent, the config names custom code or is invalid, or ``class_name`` is
        not one of transformers' classes for that model type.
    """
    where = f"architecture {HF_ARCH_PREFIX}{class_name}"
    cfg = _make_config(config, where)
    model = _instantiate(_model_class(cfg, class_name, where=where, strict=True), cfg, device=device, where=where)
    if conv1d_as_linear:
        linearize_conv1d(model)
    _set_meta(model, hf_arch(model, conv1d_as_linear=conv1d_as_linear), {}, {})
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Conv1D (GPT-2) and tied parameters
# --------------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2's transposed linear layer) or a subclass of it.

    Decided from the class's bases, so that asking about a model that is not a transformers one never
    imports ``transformers``.
    """
    return any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers") for k in type(module).__mro__)


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` equal to a GPT-2 ``Conv1D`` (whose weight is stored transposed, ``(in, out)``).

    Parameters
    ----------
    module : transformers.pytorch_utils.Conv1D
        Computes ``x @ weight + bias``.

    Returns
    -------
    nn.Linear
        ``weight = module.weight.T`` (a copy), same bias, dtype, device and train/eval flag.
    """
    _transformers()
    if not isinstance(module, nn.Module) or not is_conv1d(module):
        raise TypeError(f"module must be a transformers Conv1D, got {type(module).__name__}")
    w = module.weight
    in_features, out_features = w.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.detach().t())
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    linear.weight.requires_grad_(w.requires_grad)
    if module.bias is not None:
        linear.bias.requires_grad_(module.bias.requires_grad)
    return linear.train(module.training)


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` inside ``model`` by an equivalent ``nn.Linear``, in place.

    A ``Conv1D`` reachable under several names becomes one shared ``nn.Linear``. When ``model``
    carries an ``hf:`` architecture record, the record notes the change so the skeleton is rebuilt
    the same way.

    Returns
    -------
    list of str
        Qualified names of the replaced modules (all names of a shared one).
    """
    _transformers()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_conv1d(model):
        raise ValueError("model is itself a Conv1D: use conv1d_to_linear(model)")
    replaced: dict[int, nn.Linear] = {}
    names: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if is_conv1d(module):
            new = replaced.setdefault(id(module), conv1d_to_linear(module))
            set_submodule(model, name, new)
            names.append(name)
    meta = get_meta(model)
    arch = meta["arch"]
    if names and isinstance(arch, Mapping) and str(arch.get("name", "")).startswith(HF_ARCH_PREFIX):
        kwargs = {**dict(arch.get("kwargs") or {}), "conv1d_as_linear": True}
        _set_meta(model, {"name": arch["name"], "kwargs": kwargs}, meta.get("layers") or {}, meta.get("info") or {})
    return names


def restore_conv1d(model: nn.Module) -> list[str]:
    """Undo :func:`linearize_conv1d`, in place: every ``nn.Linear`` that is a ``Conv1D`` in the
    model class's own skeleton becomes the equal ``Conv1D`` again (weight ``W.T``), so that the
    state dict is the class's own and ``from_pretrained`` loads it.

    Returns
    -------
    list of str
        Qualified names of the restored modules.
    """
    tf = _transformers()
    cls = _model_class(model.config, type(model).__name__, where="model", strict=True)
    skeleton = _instantiate(cls, model.config, device="meta", where="model")
    restored: dict[int, nn.Module] = {}
    names: list[str] = []
    for name, module in skeleton.named_modules():
        current = model.get_submodule(name) if name else model
        if name and is_conv1d(module) and type(current) is nn.Linear:
            if id(current) not in restored:
                w = current.weight
                conv = tf.pytorch_utils.Conv1D(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    conv.weight.copy_(w.detach().t())
                    conv.bias.copy_(current.bias.detach() if current.bias is not None else torch.zeros_like(conv.bias))
                restored[id(current)] = conv.train(current.training)
            set_submodule(model, name, restored[id(current)])
            names.append(name)
    meta = get_meta(model)
    arch = meta["arch"]
    if names and isinstance(arch, Mapping) and str(arch.get("name", "")).startswith(HF_ARCH_PREFIX):
        kwargs = {k: v for k, v in dict(arch.get("kwargs") or {}).items() if k != "conv1d_as_linear"}
        _set_meta(model, {"name": arch["name"], "kwargs": kwargs}, meta.get("layers") or {}, meta.get("info") or {})
    return names


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameters registered under several names (one ``nn.Parameter`` object), e.g. tied embeddings.

    Parameters
    ----------
    model : nn.Module
        Any module; a module shared under two names makes all its parameters tied too.

    Returns
    -------
    dict
        ``{first_name: [other names]}`` for every parameter with more than one name, in
        ``named_parameters`` order, e.g. ``{"transformer.wte.weight": ["lm_head.weight"]}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return identity_groups(model.named_parameters(remove_duplicate=False))


# --------------------------------------------------------------------------------------------------
# Factorized layers (format registry)
# --------------------------------------------------------------------------------------------------
def _layer_format(module: nn.Module) -> str | None:
    return next((fmt for fmt, cls in LAYER_TYPES.items() if type(module) is cls), None)


def _apply_layers(model: nn.Module, layers: Mapping[str, Any], where: str) -> None:
    """Replace every recorded layer by its factorized structure (:func:`apply_layer_records`), in place."""
    if not isinstance(layers, Mapping):
        raise CheckpointError(f"{where}: 'layers' must be a JSON object")
    for name, record in layers.items():
        if not isinstance(record, Mapping) or not isinstance(record.get("config", {}), Mapping):
            raise CheckpointError(f"{where}: layer {name!r}: malformed record")
        if record.get("format") not in LAYER_TYPES:
            raise CheckpointError(f"{where}: layer {name!r}: unknown layer format {record.get('format')!r}")
    if apply_layer_records(model, layers, where, missing="the model") is not model:
        raise CheckpointError(f"{where}: a layer record replaces the whole model")


# --------------------------------------------------------------------------------------------------
# The custom-code route: transformers loads a compressed directory with trust_remote_code=True
# --------------------------------------------------------------------------------------------------
class CompressedModelMixin:
    """First base of the model class in a compressed directory's ``modeling_ttcompress.py``.

    ``class TTCompressModel(CompressedModelMixin, GPT2LMHeadModel)``: transformers builds the base
    class from the config (on the ``meta`` device inside ``from_pretrained``), then this replaces
    the layers that ``config.ttcompress["layers"]`` records by their factorized structure (and the
    ``Conv1D`` layers by ``nn.Linear`` where recorded), so that transformers' own loader finds
    exactly the tensors of ``model.safetensors``. The model carries ``ttcompress_meta`` with the
    base class's ``hf:`` record, so :func:`ttcompress.save` writes it as any compressed model.
    """

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        where = f"config.json {CONFIG_KEY!r}"
        base, entry = base_config(config.to_dict(), where)
        if not entry:
            raise CheckpointError(f"the config has no {CONFIG_KEY!r} entry: not a directory written by ttcompress")
        model: nn.Module = self  # type: ignore[assignment]
        linear = bool(entry.get("conv1d_as_linear"))
        if linear:
            linearize_conv1d(model)
        layers = dict(entry.get("layers") or {})
        _apply_layers(model, layers, where)
        kwargs_record: dict[str, Any] = {"config": base, **({"conv1d_as_linear": True} if linear else {})}
        _set_meta(model, {"name": HF_ARCH_PREFIX + entry["base_class"], "kwargs": kwargs_record}, layers, {})

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, reading the weights file of this layout (``variant="ttcompress"``)."""
        kwargs.setdefault("variant", COMPRESSED_VARIANT)
        return super().from_pretrained(*args, **kwargs)  # type: ignore[misc]

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``, writing the weights where :meth:`from_pretrained` reads them."""
        kwargs.setdefault("variant", COMPRESSED_VARIANT)
        return super().save_pretrained(*args, **kwargs)  # type: ignore[misc]


def _compressed_base_config(config: dict[str, Any], record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The base model's config of a compressed directory (read as data; its modeling file never runs).

    The layers its ``config.json`` records for transformers must be those of ``ttcompress.json``.
    """
    base, entry = base_config(config, where)
    if entry:
        ours = {n: {"format": r.get("format"), "config": r.get("config")}
                for n, r in (record.get("layers") or {}).items() if isinstance(r, Mapping)}
        if entry.get("layers") != ours:
            raise CheckpointError(f"{where}: the layers recorded for transformers differ from {RECORD_FILE}'s")
    return base


def _auto_classes(model_type: str, class_name: str) -> list[str]:
    """The ``AutoModel*`` classes under which transformers registers ``class_name`` for ``model_type``."""
    from transformers.models.auto import modeling_auto

    found = []
    for attr in dir(modeling_auto):
        names = getattr(getattr(getattr(modeling_auto, attr), "_model_mapping", None), "_model_mapping", None)
        if attr.startswith("AutoModel") and isinstance(names, Mapping):
            value = names.get(model_type)
            if value == class_name or (isinstance(value, (list, tuple)) and class_name in value):
                found.append(attr)
    return found


# --------------------------------------------------------------------------------------------------
# Reading a directory
# --------------------------------------------------------------------------------------------------
def load_hf_dir(path: PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """Load a Hugging Face model directory offline, without running code from it.

    Parameters
    ----------
    path : str or PathLike
        A directory with ``config.json`` and ``model.safetensors`` (or a sharded index), as
        ``save_pretrained`` or :func:`save_hf_dir` writes it.
    trust_pickle : bool, optional
        Accept a directory whose only weights are ``pytorch_model.bin`` (read with
        ``torch.load(weights_only=True)``). Default False: it is refused.

    Returns
    -------
    nn.Module
        The model, in eval mode, with float32 parameters (the class's default dtype), carrying
        ``ttcompress_meta`` (``arch`` ``hf:Class`` with the config; ``layers`` from
        ``ttcompress.json`` when the directory holds a compressed model).

    Raises
    ------
    CheckpointError
        Missing or invalid ``config.json``, custom code (``auto_map``), no weights, or weights that
        do not fit the config (checked on a ``meta`` skeleton before allocating anything).
    UnsafePickleError
        Only pickled weights and ``trust_pickle`` is False.
    """
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    config_dict = read_json(d / CONFIG_FILE, "config.json")
    record = read_record(d)
    config_dict = _compressed_base_config(config_dict, record, str(d / CONFIG_FILE))
    arch_kwargs = dict((record.get("arch") or {}).get("kwargs") or {})
    linear = bool(arch_kwargs.get("conv1d_as_linear", False))
    layers = record.get("layers") or {}  # validated by read_record

    def skeleton(device: str) -> nn.Module:
        model = _instantiate(cls, config, device=device, where=str(d))
        if linear:
            linearize_conv1d(model)
        with torch.device(device):
            _apply_layers(model, layers, str(d / RECORD_FILE))
        return model

    with open_weights(d, trust_pickle=trust_pickle) as (shapes, read):
        # The config's numbers are checked against the tensors present before transformers sees them.
        check_layer_counts(config_dict, len(shapes), str(d / CONFIG_FILE))
        config = _make_config(config_dict, str(d / CONFIG_FILE), max_labels=label_bound(shapes.values()))
        archs = config_dict.get("architectures")
        class_name = archs[0] if isinstance(archs, list) and archs else None
        cls = _model_class(config, class_name, where=str(d), strict=False)
        probe = skeleton("meta")
        keys = key_map(probe, shapes)
        check_fit(probe, {keys[k]: shapes[k] for k in keys}, str(d))
        model = skeleton("cpu")
        copy_weights(model, keys, read, str(d))
    _set_meta(model, hf_arch(model, conv1d_as_linear=linear), layers, record.get("info") or {})
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Writing a directory
# --------------------------------------------------------------------------------------------------
def _layer_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """A record ``{"format", "config", ...}`` for every factorized layer of ``model``.

    The structure comes from the layers themselves; statistics (``rel_error``, params) are kept
    from ``model.ttcompress_meta`` where it has them.
    """
    known = get_meta(model)["layers"]
    records: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        fmt = _layer_format(module)
        if fmt is not None:
            records[name] = {**dict(known.get(name) or {}), "format": fmt, "config": module.config()}
    return records


def _conv1d_replaced(model: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether a ``Conv1D`` of the class's own skeleton is something else in ``model``."""
    skeleton = _instantiate(cls, model.config, device="meta", where="model")
    current = dict(model.named_modules(remove_duplicate=False))
    return any(is_conv1d(m) and not is_conv1d(current.get(n, m)) for n, m in skeleton.named_modules())


def save_hf_dir(
    model: nn.Module,
    path: PathLike,
    *,
    plan: Plan | Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    check: bool = False,
    source_dir: PathLike | None = None,
) -> Path:
    """Write a transformers model (dense or compressed) as a Hugging Face directory, atomically.

    The directory holds ``config.json``, ``model.safetensors`` (one copy of each tied tensor,
    metadata ``{"format": "pt"}``), ``generation_config.json`` for a model that generates, and
    ``ttcompress.json``: the factorized layers (format and ``config()``), the architecture record,
    ``plan`` and ``info``. A dense model's directory loads with ``transformers``' own
    ``from_pretrained``. A compressed one loads with :func:`load_hf_dir` (as data), and with
    ``AutoModel*.from_pretrained(DIR, trust_remote_code=True)`` through ``modeling_ttcompress.py``
    (see :mod:`ttcompress.checkpoint.hf_remote`); without ``trust_remote_code`` transformers refuses it.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of one of transformers' own classes, possibly compressed by
        :func:`ttcompress.compress` and/or with its ``Conv1D`` layers linearized.
    path : str or PathLike
        The directory to write. It is written beside as a temporary directory, then renamed.
    plan : Plan or dict, optional
        The plan that was applied, recorded for reproducibility; default: the ``"plan"`` entry of
        the model's ``ttcompress_meta["info"]`` (what ``decompose`` records), if any.
    info : dict, optional
        Free-form JSON merged over the model's ``ttcompress_meta["info"]``.
    overwrite : bool, optional
        Replace an existing ``path`` (default False: :class:`OutputExistsError`).
    check : bool, optional
        Before the directory is moved into place, load it back with :func:`load_hf_dir` and
        require the same structure and bit-identical tensors (:class:`CheckpointError`
        otherwise, and nothing is written).
    source_dir : str or PathLike, optional
        The Hugging Face directory the model was read from: its other plain files (tokenizer,
        ``generation_config.json``, README, ...) are copied; weights, configs and code are not.

    Returns
    -------
    pathlib.Path
        The directory written.
    """
    if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "to_json_string"):
        raise TypeError(f"model must be a transformers model (with .config), got {type(model).__name__}")
    try:
        cls = _model_class(model.config, type(model).__name__, where="model", strict=True)
    except CheckpointError as exc:
        raise TypeError(str(exc)) from None
    meta = get_meta(model)
    arch = hf_arch(model, conv1d_as_linear=_conv1d_replaced(model, cls))
    if plan is not None and not isinstance(plan, (Plan, Mapping)):
        raise TypeError(f"plan must be a Plan or a dict, got {type(plan).__name__}")
    if info is not None and not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, got {type(info).__name__}")
    if plan is None and isinstance((meta.get("info") or {}).get("plan"), Mapping):
        plan = meta["info"]["plan"]
    plan_dict = (plan if isinstance(plan, Plan) else Plan.from_dict(plan)).to_dict() if plan is not None else None
    state = model.state_dict(keep_vars=True)
    tied = {o: first for first, others in state_groups(model).items() for o in others if o in state}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if k not in tied}
    record = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "ttcompress_version": __version__,
        "arch": {"name": arch["name"], "kwargs": {k: v for k, v in arch["kwargs"].items() if k != "config"}},
        "layers": _layer_records(model), "plan": plan_dict,
        "info": {**dict(meta.get("info") or {}), **dict(info or {})}, "tied": tied,
    }
    try:
        record_json = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"info or layer records are not JSON-serializable: {exc}") from None
    from safetensors.torch import save_file

    config = _untie_if_untied(model, arch["kwargs"]["config"])
    if record["layers"] or arch["kwargs"].get("conv1d_as_linear"):  # transformers loads it through modeling_ttcompress.py only
        config = remote_config(config, base_class=type(model).__name__, layers=record["layers"],
                               auto_classes=_auto_classes(config["model_type"], type(model).__name__),
                               conv1d_as_linear=bool(arch["kwargs"].get("conv1d_as_linear")))
    dest = Path(path)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        if source_dir is not None:
            _copy_plain_files(Path(source_dir), tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        remote = "auto_map" in config
        weights = COMPRESSED_WEIGHTS_FILE if remote else WEIGHTS_FILE
        save_file(tensors, str(tmp / weights), metadata={"format": "pt"})
        (tmp / RECORD_FILE).write_text(record_json + "\n", encoding="utf-8")
        if remote:
            (tmp / MODELING_FILE).write_text(modeling_source(
                config_class=type(model.config).__name__, model_class=type(model).__name__, version=__version__),
                encoding="utf-8")
        _write_generation_config(model, tmp)
        if check:
            _check_same(model, load_hf_dir(tmp), dest)
    return dest


#: Files of a source directory that save_hf_dir writes itself, or never copies (weights, code, pickles).
_NOT_COPIED = (CONFIG_FILE, RECORD_FILE, MODELING_FILE)
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".py", ".index.json", ".pkl", ".msgpack", ".h5")
_MAX_COPIED_BYTES = 256 << 20


def _untie_if_untied(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``tie_word_embeddings`` off when the model's output layer no longer shares the
    input embedding's weight (one of them was compressed): transformers would tie them on load."""
    if not config.get("tie_word_embeddings", False):
        return config
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    try:
        inp, out = get_in() if callable(get_in) else None, get_out() if callable(get_out) else None
    except (AttributeError, NotImplementedError):
        return config
    if out is None or getattr(out, "weight", None) is not None and out.weight is getattr(inp, "weight", None):
        return config
    return {**config, "tie_word_embeddings": False}


def _copy_plain_files(src: Path, dest: Path) -> None:
    """Copy ``src``'s top-level regular files that are not weights, configs we write, or code."""
    if not src.is_dir():
        return
    for entry in sorted(src.iterdir()):
        name = entry.name
        if (name in _NOT_COPIED or name.startswith(".") or name.endswith(_NOT_COPIED_SUFFIXES)
                or entry.is_symlink() or not entry.is_file() or entry.stat().st_size > _MAX_COPIED_BYTES):
            continue
        shutil.copyfile(entry, dest / name)


def _write_generation_config(model: nn.Module, dest: Path) -> None:
    """``generation_config.json`` of a model that generates, unless copied from the source directory."""
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is None or (dest / "generation_config.json").exists() or not callable(can_generate) or not can_generate():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generation.to_json_file(str(dest / "generation_config.json"))


def _check_same(model: nn.Module, back: nn.Module, dest: Path) -> None:
    """``back`` (read from the written directory) has ``model``'s layer types and bit-identical tensors."""
    types = {n: type(m) for n, m in model.named_modules()}
    differ = [n for n, m in back.named_modules() if types.get(n) is not type(m)]
    ours, theirs = model.state_dict(), back.state_dict()
    differ += [k for k in ours if k not in theirs or not torch.equal(ours[k].detach().cpu().to(theirs[k].dtype), theirs[k])]
    if differ or set(ours) != set(theirs):
        raise CheckpointError(f"{dest}: the written directory does not load back as the same model "
                              f"(first difference: {(differ or sorted(set(ours) ^ set(theirs)))[0]!r}); nothing written")
