"""Rebuild a model from a checkpoint header and its tensors, without unpickling anything.

The header is untrusted data, validated by :mod:`ttcompress.checkpoint.header` first. :func:`rebuild_model`
then checks that the architecture may be built (:func:`ttcompress.checkpoint.models.check_arch_trusted`),
builds the architecture on the ``meta`` device with every recorded layer replaced by its
format's :meth:`~ttcompress.formats.base.CompressionFormat.rebuild`, compares every tensor shape
with the tensors present in the file, and only then allocates real storage and loads them.
"""

from __future__ import annotations

import collections
import copy
import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode

from ttcompress.errors import ArchRequiredError, CheckpointError, InputError, shape_mismatches, short_error
from ttcompress.checkpoint.header import check_layer_counts, config_items
from ttcompress.checkpoint.hf_config import check_label_counts, label_bound
from ttcompress.checkpoint.meta import ArchSpec, ModelMeta, set_meta
from ttcompress.layer_report import LayerReport
from ttcompress.checkpoint.models import build_arch, check_arch_trusted, resolve_arch
from ttcompress.checkpoint.layer_records import apply_layer_records

__all__ = ["Skeleton", "fit_state_dict", "rebuild_model", "skeleton_factory"]


def fit_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str) -> None:
    """``load_state_dict(strict=True)`` with one concise line for every kind of mismatch."""
    problems = shape_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                {k: tuple(v.shape) for k, v in sd.items()})
    if problems:
        raise CheckpointError(f"state dict does not fit {what}: " + "; ".join(problems))
    if getattr(sd, "_metadata", None) is None:
        # Modules' state-dict versions (torch.save keeps them; safetensors does not): the current
        # classes' own, which is what the file was written from (MNASNet refuses a missing one).
        versions = model.state_dict()._metadata  # type: ignore[attr-defined]
        sd = collections.OrderedDict(sd)
        sd._metadata = versions  # type: ignore[attr-defined]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"state dict does not fit {what}: {short_error(exc)}") from None



Skeleton = Callable[[], nn.Module]


def rebuild_model(
    header: Mapping[str, Any],
    tensors: dict[str, torch.Tensor],
    p: Path,
    *,
    user_arch: str | None,
    trust_code: bool,
    skeleton: Skeleton | None = None,
    user_spec: ArchSpec | None = None,
) -> nn.Module:
    """Rebuild a checkpoint's model: check trust, build it on ``meta`` and compare shapes, then build it.

    Parameters
    ----------
    header : mapping
        The validated header (:func:`ttcompress.checkpoint.header.validate_header`).
    tensors : dict
        The file's tensors (tied duplicates are added from ``header["tied"]``).
    p : Path
        The file, for messages.
    user_arch : str, optional
        The architecture name the caller gave (an import path it names is trusted).
    trust_code : bool
        Allow any import path recorded in the header.
    skeleton : callable, optional
        Builds the dense model the recorded layers are put into, instead of the header's
        architecture (for a file that records none, or a caller that supplies its own model).
        Nothing named in the file is then imported.
    user_spec : ArchSpec, optional
        The architecture to record on the model when the header has none.

    Raises
    ------
    ArchRequiredError
        The header records no architecture and no ``skeleton`` was given.
    """
    arch = header.get("arch")
    given = skeleton is not None  # the caller's own model: check that its layers fit the recorded ones
    if skeleton is None:
        if not isinstance(arch, Mapping):
            raise ArchRequiredError(
                f"{p} records the weights and the applied plan but no architecture (it was saved from a model "
                "ttcompress cannot rebuild by name); pass the dense model it came from: --arch NAME (Python: "
                "arch=a model instance, a callable or a name)"
            )
        name = arch["name"]
        check_arch_trusted(name, source=f"{p} (header field arch.name)", user_arch=user_arch, trust_code=trust_code)
        skeleton = functools.partial(_build_named, arch, p)
    if isinstance(arch, Mapping):
        check_layer_counts(arch.get("kwargs"), len(tensors) + len(header.get("tied") or {}), f"{p} (header arch.kwargs)")
        check_label_counts(arch.get("kwargs"), label_bound(t.shape for t in tensors.values()), f"{p} (header arch.kwargs)")
    layers = {str(k): dict(v) for k, v in (header.get("layers") or {}).items()}
    tied = dict(header.get("tied") or {})
    for dup, kept in tied.items():
        if dup in tensors:
            raise CheckpointError(f"{p}: tensor {dup!r} is stored and also listed as tied to {kept!r}")
        if kept not in tensors:
            raise CheckpointError(f"{p}: tied tensor {dup!r} refers to {kept!r}, which is not in the file")
        tensors[dup] = tensors[kept]
    named = arch if isinstance(arch, Mapping) and not given else None  # built by the name in the file
    if named is not None:
        # Import the architecture's module now, not under the meta device below: tensors a module
        # makes at import time (a window, a table) would otherwise be meta for the whole process.
        try:
            resolve_arch(named["name"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{p}: cannot build arch {named['name']!r} from the header: {short_error(exc)}") from None
    probe, on_meta = _probe(skeleton, layers, tensors, p, check_sizes=given, named=named)
    _compare_shapes(probe, tensors, layers, p)
    # Allocate only what the file holds: the meta skeleton gets storage and the file's tensors fill
    # it. A module with tensors that the file does not hold (non-persistent buffers, plain tensor
    # attributes) is built for real instead.
    if not on_meta:
        model = probe
    elif {k for k, _ in probe.named_buffers()} <= set(probe.state_dict()) and not _plain_tensors(probe):
        model = _materialize(probe)
    else:
        model = _build_structure(skeleton, layers, p, check_sizes=given)
    what = f"arch {arch['name']!r} (file {p})" if isinstance(arch, Mapping) else f"the given arch (file {p})"
    _match_stored_dtypes(model, layers, tensors)
    fit_state_dict(model, tensors, what=what)
    records = {k: LayerReport.from_meta(k, v) for k, v in layers.items()}
    spec = ArchSpec.from_dict(arch) if isinstance(arch, Mapping) else user_spec
    set_meta(model, ModelMeta(spec, records, dict(header.get("info") or {})))
    return model


def _probe(skeleton: Skeleton, layers: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor],
           p: Path, *, check_sizes: bool, named: Mapping[str, Any] | None) -> tuple[nn.Module, bool]:
    """The structure on ``meta`` (no memory), or, for an ``__init__`` that reads tensor values
    (RegNet), with only small tensors real: then sized by nothing the file could inflate. Every
    int in the recorded kwargs is at most the largest dimension among the file's non-empty
    tensors (num_classes=10**9 is refused), a tensor of more than :data:`SMALL_TENSOR` elements
    stays on ``meta``, and the real ones together hold at most as many elements as the file's
    tensors plus :data:`BUILD_SLACK`, checked before each allocation (no header number, no shape
    of an empty tensor, counts). Returns ``(model, may_hold_meta_tensors)``."""
    try:
        with torch.device("meta"), _SkipRandomInit():
            return _build_structure(skeleton, layers, p, check_sizes=check_sizes), True
    except Exception:  # noqa: BLE001 - whatever the meta build raised, the next build says it again or works
        if named is not None:
            _check_kwargs_fit(named.get("kwargs"), tensors, p)
    cap = sum(t.numel() for t in tensors.values()) + BUILD_SLACK
    try:
        with _AllocationCap(cap, p), _LargeOnMeta(), _SkipRandomInit():
            return _build_structure(skeleton, layers, p, check_sizes=check_sizes), True
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - an __init__ that reads a large tensor's values: all real, capped
        with _AllocationCap(cap, p):
            return _build_structure(skeleton, layers, p, check_sizes=check_sizes), False


#: Largest tensor an architecture that cannot be built on ``meta`` gets for real while its
#: structure is compared with the file (the values its ``__init__`` reads: RegNet's widths).
SMALL_TENSOR = 2**16
#: Elements beyond the file's own that such a build may allocate for real.
BUILD_SLACK = 2**24


class _LargeOnMeta(TorchFunctionMode):
    """Tensor factories called without a device make a ``meta`` tensor when it would hold more
    than :data:`SMALL_TENSOR` elements, else a real (CPU) one."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("device") is None and func in _device_constructors():
            shaped = func(*args, **{**kwargs, "device": "meta"})
            if not isinstance(shaped, torch.Tensor) or shaped.numel() > SMALL_TENSOR:
                return shaped
        return func(*args, **kwargs)


def _match_stored_dtypes(model: nn.Module, layers: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Give every floating parameter and buffer the dtype its stored tensor has, so that the model
    loads in the dtype it was saved in (a half-precision checkpoint is half throughout: loading
    would otherwise keep the built layers' default float32 wherever ``load_state_dict`` copies,
    and the model would mix dtypes). ``layers`` is unused (kept for the callers)."""
    del layers
    for name, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                stored = tensors.get(f"{name}.{key}" if name else key)
                if t is None or stored is None or not (t.is_floating_point() and stored.is_floating_point()):
                    continue
                if stored.dtype != t.dtype:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(stored.dtype)
                    else:
                        store[key] = t.to(stored.dtype)


def skeleton_factory(arch: Any, kwargs: Mapping[str, Any] | None) -> Skeleton | None:
    """A builder of the dense model from a caller's ``arch``: a module instance (copied) or a callable.

    ``None`` for a name or ``None`` (those are built by name, with the trust checks).

    Raises
    ------
    TypeError
        ``arch`` is none of a str, an ``nn.Module`` or a callable.
    InputError
        ``kwargs`` given with a module instance (``param="arch_kwargs"``).
    """
    if arch is None or isinstance(arch, str):
        return None
    if isinstance(arch, nn.Module):
        if kwargs:
            raise InputError("arch_kwargs", "cannot be given with a module instance as arch")
        return functools.partial(copy.deepcopy, arch)
    if callable(arch):
        return functools.partial(_call_arch, arch, dict(kwargs or {}))
    raise TypeError(f"arch must be a name, an nn.Module or a callable returning one, got {type(arch).__name__}")


def _call_arch(factory: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    model = factory(**copy.deepcopy(kwargs))
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch returned {type(model).__name__}, not an nn.Module")
    return model


def _build_named(arch: Mapping[str, Any], p: Path) -> nn.Module:
    name = arch["name"]
    try:
        return build_arch(name, kwargs=arch.get("kwargs") or {})
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{p}: cannot build arch {name!r} from the header: {short_error(exc)}") from None


def _plain_tensors(model: nn.Module) -> bool:
    """True if a submodule keeps a tensor as a plain attribute (neither parameter nor buffer)."""
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v))
        for m in model.modules() for v in vars(m).values()
    )  # fmt: skip


def _materialize(model: nn.Module) -> nn.Module:
    """Give a ``meta`` model uninitialized CPU storage in place, keeping shared parameters shared."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for key, t in slots.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in memo:
                    empty = torch.empty_like(t, device="cpu")
                    memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                slots[key] = memo[id(t)]
    return model


class _SkipRandomInit(TorchFunctionMode):
    """Skip random in-place fills of ``meta`` tensors (they hold no data; PyTorch's meta kernel for
    ``normal_`` imports ``torch._dynamo``, seconds of start-up for nothing)."""

    _OPS = frozenset({"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "cauchy_", "log_normal_",
                      "geometric_"})  # fmt: skip

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self._OPS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _check_kwargs_fit(kwargs: Any, tensors: Mapping[str, torch.Tensor], p: Path) -> None:
    # only tensors that hold elements: the shape of an empty one ([2**31, 0]) costs the file nothing
    largest = max((max(t.shape, default=1) for t in tensors.values() if t.numel()), default=1)
    for name, value in config_items(kwargs):
        if isinstance(value, int) and not isinstance(value, bool) and value > largest:
            raise CheckpointError(f"{p}: arch kwargs {name} = {value} exceeds every dimension of the file's "
                                  f"tensors (largest {largest}); refusing to build it")


class _AllocationCap(TorchDispatchMode):
    """Refuse, before allocating, tensor creations that together exceed ``cap`` elements: a model
    that cannot be built on ``meta`` is built for real only as large as its file's tensors allow."""

    _FACTORIES = ("empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint", "normal")

    def __init__(self, cap: int, p: Path) -> None:
        super().__init__()
        self.cap, self.p, self.used = cap, p, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        real = torch.device(kwargs.get("device") or "cpu").type != "meta"  # meta tensors cost nothing
        if real and func.overloadpacket.__name__ in self._FACTORIES and args and isinstance(args[0], (list, tuple)):
            size = args[0]
            if all(isinstance(n, int) for n in size):
                self.used += math.prod(size)
                if self.used > self.cap:
                    raise CheckpointError(f"{self.p}: the recorded architecture needs more than {self.cap:,} "
                                          "elements, more than the file holds; refusing to build it")
        return func(*args, **kwargs)


def _build_structure(
    skeleton: Skeleton, layers: Mapping[str, Mapping[str, Any]], p: Path, *, check_sizes: bool
) -> nn.Module:
    """The dense skeleton with every recorded layer replaced by its (randomly initialized) compressed layer.

    With ``check_sizes``, a replaced layer's sizes (``in_features``, ...) must be the recorded ones.
    """
    model = skeleton()
    if not isinstance(model, nn.Module):
        raise TypeError(f"arch returned {type(model).__name__}, not an nn.Module")
    return apply_layer_records(model, layers, str(p), check_sizes=check_sizes)




def _compare_shapes(
    skeleton: nn.Module, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, Any], p: Path
) -> None:
    """One line naming the layer whose recorded structure does not match the tensors in the file."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}

    def owner(key: str) -> str:
        hits = [n for n in layers if key.startswith(n + ".")]
        return f"layer {max(hits, key=len)!r}" if hits else "the architecture"

    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{p}: {owner(key)} needs tensor {key!r} {list(shape)}, which is not in the file")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{p}: {owner(key)} does not match the file: the header asks for {key!r} of shape {list(shape)} "
                f"({math.prod(shape):,} elements), the file has {list(tensors[key].shape)}"
            )
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise CheckpointError(
            f"{p}: {owner(extra[0])} does not match the file: {len(extra)} tensor(s) not in the rebuilt model, "
            f"e.g. {extra[0]!r}"
        )
