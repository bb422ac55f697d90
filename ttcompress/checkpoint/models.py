"""Built-in architectures and the ``--arch`` name resolver.

:func:`build_arch` turns a name plus JSON keyword arguments into a freshly initialized module and
records both in ``model.ttcompress_meta["arch"]``, so that a checkpoint saved from it can be
rebuilt without pickling code.

Built-ins (defaults shown; all take ``num_classes``; the conv nets also ``in_channels`` and
``input_size``, the FC nets ``in_features``):

``seed-cnn`` (65,148 params)
    The MNIST network of the CP-decomposition paper [1]_: conv 3×3 1→10 → ReLU → max-pool 2 →
    conv 3×3 10→10 → ReLU → max-pool 2 → FC 490→128 → ReLU → FC 128→10. The paper fixes the two
    10-filter 3×3 convs; the paper's conv compression figures (7.7× at CP rank 3, 3.8× at 6,
    2.6× at 9) match these two convs exactly. Pooling (2×2 max after each conv, padding 1) and
    the hidden width (128) are our choice.
``seed-fc3`` (11,638,814 params)
    The TT thesis' fully connected net [2]_: 784→4096→2048→10, each Linear followed by
    BatchNorm1d (the output layer too), ReLU between layers.
``seed-tt2`` (791,294 params)
    The thesis' TT network: TTLinear 784→262,144 (modes 2·2·7·4·7 → 8·16·16·16·8, rank 4) →
    BatchNorm1d(262,144) → ReLU → TTLinear 262,144→10 (modes 8·16·16·16·8 → 5·2·1·1·1, rank 4)
    → BatchNorm1d(10). Cores 64+512+1792+1024+224 and 160+512+256+256+32, biases 262,144+10,
    BatchNorm 2·262,144+2·10.
``lenet5`` (61,706 params)
    LeCun et al. [3]_ in its common modern form: conv 5×5 1→6 (padding 2) → ReLU → max-pool →
    conv 5×5 6→16 → ReLU → max-pool → FC 400→120→84→10.

Plus ``torchvision:NAME`` (any ``torchvision.models`` builder, keyword arguments passed through,
e.g. ``{"num_classes": 10}``), ``hf:CLASS`` (a ``transformers`` model class built from the
``config`` keyword argument by :func:`ttcompress.checkpoint.hf.build_hf_model`; the class must be one that
transformers registers for the config's ``model_type``, and a config naming custom code is refused)
and ``package.module:callable`` (any importable factory returning an ``nn.Module``).

Trust: :func:`build_arch` imports and calls a ``package.module:callable`` because its caller (the
user, on the command line or in Python) named it. A name read from a file is checked first with
:func:`check_arch_trusted`: built-ins and ``torchvision:NAME`` (resolved through torchvision's own
model registry, never by importing a string) and ``hf:CLASS`` (looked up in transformers' own
registry) are always allowed; an import path only when the user
named the same path or passed ``trust_code=True``.

References
----------
.. [1] V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up Convolutional
   Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015.
.. [2] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural Networks",
   NeurIPS 2015 (TT-matrix fully connected layers).
.. [3] Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to document
   recognition", Proc. IEEE 1998.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ttcompress.checkpoint.usercode import import_callable
from ttcompress.errors import InputError, UntrustedCodeError, short_error
from ttcompress.checkpoint.hf import HF_ARCH_PREFIX, build_hf_model
from ttcompress.checkpoint.meta import update_meta

__all__ = [
    "BUILTIN_ARCHS",
    "SeedCNN",
    "LeNet5",
    "build_arch",
    "check_arch_trusted",
    "is_import_path",
    "list_archs",
    "seed_fc3",
    "seed_tt2",
]


class SeedCNN(nn.Module):
    """The CP paper's MNIST CNN (see the module docstring).

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 1
    input_size : int, default 28
        Side of the square input; must be divisible by 4.
    hidden : int, default 128
        Width of the hidden fully connected layer.
    filters : int, default 10
    """

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, hidden: int = 128, filters: int = 10
    ) -> None:
        super().__init__()
        _positive(num_classes=num_classes, in_channels=in_channels, hidden=hidden, filters=filters)
        if not isinstance(input_size, int) or input_size < 4 or input_size % 4:
            raise ValueError(f"input_size must be a positive multiple of 4, got {input_size!r}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, filters, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(filters, filters, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(filters * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling (see the module docstring).

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 1
    input_size : int, default 28
        Side of the square input (28 uses padding 2 on the first conv, as in 32×32 LeNet; must be
        at least 12).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        _positive(num_classes=num_classes, in_channels=in_channels)
        if not isinstance(input_size, int) or input_size < 12:
            raise ValueError(f"input_size must be an int >= 12, got {input_size!r}")
        pad = 2 if input_size == 28 else 0
        side = ((input_size + 2 * pad - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def seed_fc3(*, num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] | list[int] = (4096, 2048)) -> nn.Sequential:
    """The TT thesis' dense net: Linear+BatchNorm1d blocks, ReLU between, BatchNorm1d on the output.

    With the defaults (784→4096→2048→10) it has exactly 11,638,814 trainable parameters.
    """
    _positive(num_classes=num_classes, in_features=in_features)
    widths = [in_features, *[int(h) for h in hidden], num_classes]
    if any(w < 1 for w in widths):
        raise ValueError(f"hidden sizes must be positive, got {list(hidden)!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b)]
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def seed_tt2(
    *,
    num_classes: int = 10,
    rank: int = 4,
    in_modes: tuple[int, ...] | list[int] = (2, 2, 7, 4, 7),
    hidden_modes: tuple[int, ...] | list[int] = (8, 16, 16, 16, 8),
    out_modes: tuple[int, ...] | list[int] = (5, 2, 1, 1, 1),
) -> nn.Sequential:
    """The TT thesis' two-layer TT net, 784→262,144→10 (exactly 791,294 params with the defaults).

    ``TTLinear(in, hidden) → BatchNorm1d → ReLU → TTLinear(hidden, classes) → BatchNorm1d``.
    ``prod(out_modes)`` must equal ``num_classes``.
    """
    from ttcompress.layers.tt_linear import TTLinear

    _positive(num_classes=num_classes, rank=rank)
    n_in, n_hidden, n_out = _prod(in_modes), _prod(hidden_modes), _prod(out_modes)
    if n_out != num_classes:
        raise ValueError(f"out_modes {list(out_modes)} multiply to {n_out}, not num_classes={num_classes}")
    if len(in_modes) != len(hidden_modes) or len(hidden_modes) != len(out_modes):
        raise ValueError("in_modes, hidden_modes and out_modes must have the same length")
    return nn.Sequential(
        nn.Flatten(),
        TTLinear(n_in, n_hidden, ranks=rank, in_modes=tuple(in_modes), out_modes=tuple(hidden_modes)),
        nn.BatchNorm1d(n_hidden),
        nn.ReLU(),
        TTLinear(n_hidden, n_out, ranks=rank, in_modes=tuple(hidden_modes), out_modes=tuple(out_modes)),
        nn.BatchNorm1d(n_out),
    )


#: name -> (factory, one-line description)
BUILTIN_ARCHS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "seed-cnn": (SeedCNN, "CP paper MNIST CNN: 2 conv 3x3 (10 filters) + FC 128 + FC 10 (65,148 params)"),
    "seed-fc3": (seed_fc3, "TT thesis dense net 784-4096-2048-10 with BatchNorm1d (11,638,814 params)"),
    "seed-tt2": (seed_tt2, "TT thesis TT net 784-262144-10, two TTLinear rank 4 + BatchNorm1d (791,294 params)"),
    "lenet5": (LeNet5, "LeNet-5 with ReLU and max pooling (61,706 params)"),
}


def list_archs() -> dict[str, str]:
    """Built-in architecture names with a one-line description, plus the two name patterns."""
    names = {name: desc for name, (_, desc) in BUILTIN_ARCHS.items()}
    names["torchvision:NAME"] = "any torchvision.models classifier, e.g. torchvision:resnet18"
    names["hf:CLASS"] = "a transformers model class, built from kwargs {'config': {...config.json...}}"
    names["package.module:callable"] = "any importable factory returning an nn.Module"
    return names


def build_arch(name: str, *, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a freshly initialized model by architecture name.

    Parameters
    ----------
    name : str
        A built-in (``"seed-cnn"``, ``"seed-fc3"``, ``"seed-tt2"``, ``"lenet5"``),
        ``"torchvision:NAME"`` or ``"package.module:callable"``.
    kwargs : mapping or None
        JSON-serializable keyword arguments for the builder (recorded in the metadata).

    Returns
    -------
    nn.Module
        With ``model.ttcompress_meta["arch"] == {"name": name, "kwargs": dict(kwargs)}``.

    Raises
    ------
    InputError
        ``param="arch"``: not a name, an unknown one (the message lists the choices) or a builder
        that does not return an ``nn.Module``; ``param="arch_kwargs"``: kwargs that are not
        JSON-serializable, or that the builder rejects (its ``TypeError``, ``ValueError``,
        ``KeyError`` or ``AssertionError``: a third-party constructor saying the arguments do not
        fit it). Both are ValueErrors.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError("arch", f"must be a non-empty str, got {name!r}")
    name = name.strip()
    kw = dict(kwargs or {})
    try:
        json.dumps(kw)
    except (TypeError, ValueError) as exc:
        raise InputError("arch_kwargs", f"must be JSON-serializable: {exc}") from exc
    factory = _resolve(name)
    try:
        model = factory(**copy.deepcopy(kw))
    except (TypeError, ValueError, KeyError, AssertionError) as exc:  # the builder refused these kwargs
        if isinstance(exc, InputError):
            raise
        raise InputError("arch_kwargs", f"{kw} do not fit arch {name!r}: {short_error(exc, 300)}") from exc
    if not isinstance(model, nn.Module):
        raise InputError("arch", f"{name!r} returned {type(model).__name__}, not an nn.Module")
    _set_arch_meta(model, {"name": name, "kwargs": kw})
    return model


def resolve_arch(name: str) -> Callable[..., nn.Module]:
    """The builder an architecture name stands for, its module imported (no model is built).

    Raises
    ------
    InputError
        ``param="arch"``: an unknown name.
    UserInputError
        A ``package.module:callable`` that cannot be imported.
    """
    return _resolve(name.strip())


def is_import_path(name: str) -> bool:
    """True if ``name`` is a ``package.module:callable`` import path (not a built-in, torchvision or hf)."""
    key = name.strip().lower()
    return ":" in key and not key.startswith(("torchvision:", HF_ARCH_PREFIX))


def check_arch_trusted(name: str, *, source: str, user_arch: str | None = None, trust_code: bool = False) -> None:
    """Refuse an architecture name read from a file if building it would import code the user did not name.

    Parameters
    ----------
    name : str
        The architecture name found in the file.
    source : str
        Where it was found, for the message (e.g. ``"model.tt.pt, header field arch.name"``).
    user_arch : str, optional
        The architecture the user named (``arch=``); the same import path is allowed.
    trust_code : bool, default False
        Allow any import path.

    Raises
    ------
    UntrustedCodeError
        ``name`` is an import path, ``user_arch`` differs from it and ``trust_code`` is False.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if trust_code or not is_import_path(name):
        return
    if user_arch is not None and user_arch.strip() == name.strip():
        return
    raise UntrustedCodeError(
        f"{source} names the import path {name!r}; ttcompress does not import or call code named in a "
        "file. If you trust the file's source, pass --trust-code (Python: trust_code=True) or name the "
        "same architecture with --arch (Python: arch=...)"
    )


def _resolve(name: str) -> Callable[..., nn.Module]:
    key = name.lower()
    if key in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[key][0]
    if key.startswith("torchvision:"):
        import torchvision.models as tvm

        tv_name = name.split(":", 1)[1]
        available = tvm.list_models(module=tvm)
        if tv_name not in available:
            hint = ", ".join(n for n in available if n.startswith(tv_name[:3].lower()))[:200]
            raise InputError(
                "arch", f"names an unknown torchvision model {tv_name!r}" + (f" (similar: {hint})" if hint else "")
                + "; see torchvision.models.list_models()"
            )
        return lambda **kw: tvm.get_model(tv_name, **kw)
    if key.startswith(HF_ARCH_PREFIX):
        return functools.partial(build_hf_model, name[len(HF_ARCH_PREFIX):])
    if ":" in name:  # an import path the user named (a name read from a file passed check_arch_trusted)
        return import_callable(name, what="arch")
    raise InputError("arch", f"{name!r} is unknown; choose from {', '.join(list_archs())}")


def _set_arch_meta(model: nn.Module, arch: dict[str, Any]) -> None:
    update_meta(model, arch=arch)


def _positive(**values: int) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


def _prod(values: tuple[int, ...] | list[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
