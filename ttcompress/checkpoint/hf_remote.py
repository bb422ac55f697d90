"""A compressed Hugging Face directory that transformers loads only through its custom-code route.

A compressed model's factorized layers (TT cores, CP factors, ...) do not fit the state dict of
the transformers class it came from: loaded by that class, every factor would be "unexpected" and
every dense weight "missing" and randomly initialised, silently. So :func:`ttcompress.checkpoint.hf.save_hf_dir`
writes a compressed model's ``config.json`` the way a custom architecture on the hub is written
(transformers' ``auto_map`` + ``trust_remote_code`` mechanism):

* ``model_type`` is ``ttcompress_<base model_type>``, registered nowhere: without
  ``trust_remote_code=True``, ``AutoConfig``/``AutoModel*.from_pretrained(DIR)`` refuse the
  directory with an error instead of loading random weights;
* ``auto_map`` points ``AutoConfig`` and every ``AutoModel*`` class the base class is registered
  under (plus ``AutoModel``) at :data:`MODELING_FILE`, written into the directory. That file is a
  few lines: a config class and a model class that subclass the base transformers classes and
  :class:`ttcompress.checkpoint.hf.CompressedModelMixin`, which builds the factorized layers recorded in
  ``config.json`` (key ``"ttcompress"``) before transformers loads the weights;
* the base ``model_type``, class and the layer records stay in ``config.json["ttcompress"]``, so
  :func:`ttcompress.load` reads the directory as data (:func:`base_config`) and never imports the
  modeling file.

These are pure functions on JSON; nothing here imports transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ttcompress.errors import CheckpointError

__all__ = [
    "CONFIG_KEY",
    "MODELING_FILE",
    "MODEL_TYPE_PREFIX",
    "base_config",
    "is_remote_config",
    "modeling_source",
    "remote_config",
]

#: The file written into a compressed directory, named by ``auto_map``.
MODELING_FILE = "modeling_ttcompress.py"
#: ``config.json``'s ``model_type`` of a compressed directory is this prefix + the base model type.
MODEL_TYPE_PREFIX = "ttcompress_"
#: Where ``config.json`` keeps the base model type and class and the factorized layers.
CONFIG_KEY = "ttcompress"
_CONFIG_CLASS = "TTCompressConfig"
_MODEL_CLASS = "TTCompressModel"
_MODULE = MODELING_FILE.removesuffix(".py")


def remote_config(
    config: Mapping[str, Any],
    *,
    base_class: str,
    auto_classes: Sequence[str],
    layers: Mapping[str, Any],
    conv1d_as_linear: bool,
) -> dict[str, Any]:
    """``config.json`` of a compressed directory, from the base model's full config.

    Parameters
    ----------
    config : dict
        The base model's config as ``config.json`` holds it (with its ``model_type``).
    base_class : str
        The transformers class the model is an instance of (``"GPT2LMHeadModel"``).
    auto_classes : sequence of str
        The ``AutoModel*`` classes that should load the directory (``"AutoModelForCausalLM"``).
    layers : dict
        ``{qualified name: {"format", "config"}}`` of the factorized layers.
    conv1d_as_linear : bool
        Whether the model's ``Conv1D`` layers were replaced by ``nn.Linear``.
    """
    base_type = config.get("model_type")
    if not isinstance(base_type, str) or not base_type:
        raise ValueError(f"config must name its model_type, got {base_type!r}")
    auto_map = {"AutoConfig": f"{_MODULE}.{_CONFIG_CLASS}"}
    auto_map.update({name: f"{_MODULE}.{_MODEL_CLASS}" for name in sorted({"AutoModel", *auto_classes})})
    return {
        **dict(config),
        "model_type": MODEL_TYPE_PREFIX + base_type,
        "architectures": [_MODEL_CLASS],
        "auto_map": auto_map,
        CONFIG_KEY: {
            "base_model_type": base_type,
            "base_class": base_class,
            "conv1d_as_linear": bool(conv1d_as_linear),
            "layers": {name: {"format": r["format"], "config": r["config"]} for name, r in layers.items()},
        },
    }


def is_remote_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` is a compressed directory's ``config.json`` written by :func:`remote_config`."""
    return isinstance(config.get(CONFIG_KEY), Mapping) and str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX)


def base_config(config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base model's config and the ``"ttcompress"`` entry, read as data from a compressed ``config.json``.

    ``auto_map`` is dropped (the modeling file is never imported); ``model_type`` and
    ``architectures`` are the base model's again. A config that :func:`is_remote_config` rejects
    comes back unchanged, with an empty entry.
    """
    if not is_remote_config(config):
        return dict(config), {}
    entry = dict(config[CONFIG_KEY])
    base_type, base_class = entry.get("base_model_type"), entry.get("base_class")
    if not isinstance(base_type, str) or config["model_type"] != MODEL_TYPE_PREFIX + base_type:
        raise CheckpointError(f"{where}: model_type {config['model_type']!r} does not match "
                              f"{CONFIG_KEY}.base_model_type {base_type!r}")
    if not isinstance(base_class, str) or not isinstance(entry.get("layers", {}), Mapping):
        raise CheckpointError(f"{where}: malformed {CONFIG_KEY!r} entry")
    base = {k: v for k, v in config.items() if k not in ("auto_map", CONFIG_KEY)}
    base.update(model_type=base_type, architectures=[base_class])
    return base, entry


def modeling_source(*, config_class: str, model_class: str, version: str) -> str:
    """The text of :data:`MODELING_FILE` for a model of transformers classes ``model_class``/``config_class``."""
    for name in (config_class, model_class):
        if not name.isidentifier():
            raise ValueError(f"not a class name: {name!r}")
    return f'''"""A model compressed by ttcompress {version}: transformers' custom-code entry point for this directory.

Load it with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (or the
``AutoModel*`` class of the task); it needs ``pip install ttcompress``. The classes below are the
transformers classes {model_class} / {config_class} with the factorized layers that
``config.json["ttcompress"]["layers"]`` records (built by ttcompress before the weights load).
``ttcompress.load(DIR)`` reads the same directory without this file.
"""

from transformers import {config_class}, {model_class}

from ttcompress.checkpoint.hf import CompressedModelMixin


class {_CONFIG_CLASS}({config_class}):
    model_type = "{MODEL_TYPE_PREFIX}" + {config_class}.model_type


class {_MODEL_CLASS}(CompressedModelMixin, {model_class}):
    config_class = {_CONFIG_CLASS}
'''
