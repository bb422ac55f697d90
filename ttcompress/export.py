"""Export a (compressed) model for deployment: ONNX, TorchScript, or merged back to dense.

* ``onnx``: :func:`torch.onnx.export` with the ``torch.export`` (dynamo) exporter and a dynamic
  batch dimension. The factorized layers stay factorized in the graph, so the file holds the
  compressed parameters.
* ``torchscript``: :func:`torch.jit.trace` (the factorized layers choose their contraction in
  Python, which scripting cannot compile; tracing records it).
* ``dense``: every factorized layer merged back into the dense layer it replaced
  (``merge="all"``): a plain model of the original architecture, whose state dict loads into that
  architecture with no ttcompress code. ``merge="slower"`` merges only the layers whose factorized
  form measured slower than the merged one on the layer's real input shape, and keeps the rest.
* ``hf``: a transformers model (loaded from a Hugging Face directory, or built from a config)
  written back as a directory in the same layout (``config.json`` + ``model.safetensors``) by
  :func:`ttcompress.checkpoint.hf.save_hf_dir`, with the applied layers and plan in ``ttcompress.json``, so
  that :func:`ttcompress.load` rebuilds the compressed model from it. Refused for other models.

Every export is checked before it is written: the exported program is run (onnxruntime for ONNX)
at two batch sizes, so that a batch size baked into the graph is caught, and its outputs must match
the model's within ``atol`` (relative to the output's scale); an ``hf`` directory is loaded back and
must hold the same layers and bit-identical tensors. Nothing is written when a check fails.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import io
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ttcompress.errors import InputError, TTCompressError, UserInputError
from ttcompress.checkpoint.hf import recorded_hf_arch, restore_conv1d, save_hf_dir
from ttcompress.layers._export import keep_factors
from ttcompress.checkpoint.io import atomic_write, get_meta, save, update_meta
from ttcompress.checkpoint.meta import ModelMeta, set_meta
from ttcompress.report.measure import example_input
from ttcompress.outputs import primary_output
from ttcompress.modtree import get_submodule, set_submodule

__all__ = ["EXPORT_FORMATS", "ExportError", "ExportResult", "LayerMerge", "export_model", "merge_to_dense", "require_onnx"]

ExportFormat = Literal["onnx", "torchscript", "dense", "hf"]
#: The formats :func:`export_model` writes.
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "torchscript", "dense", "hf")
#: The methods a factorized layer offers to rebuild the dense module it replaced.
_TO_DENSE = ("to_dense", "to_linear", "to_conv", "to_embedding", "to_mha")
#: What installs the packages ONNX export needs.
EXPORT_EXTRA = "pip install 'ttcompress[export]'"


class ExportError(TTCompressError):
    """The model cannot be exported in that format, or the export does not reproduce the model."""


@dataclass(frozen=True)
class LayerMerge:
    """What ``dense`` export did with one factorized layer (times in ms per call, when measured)."""

    name: str
    merged: bool
    factorized_ms: float | None = None
    dense_ms: float | None = None


@dataclass(frozen=True)
class OnnxLatency:
    """onnxruntime latency (CPU provider, ms per call: median and IQR over interleaved rounds) of the
    exported graph and of the dense-merged graph of the same model, on one batch size."""

    batch_size: int
    ms: float
    iqr_ms: float
    dense_ms: float
    dense_iqr_ms: float
    dense_size_bytes: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms if self.ms > 0 else float("inf")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how it was checked."""

    path: Path
    format: str
    size_bytes: int
    max_error: float | None
    checked_batches: tuple[int, ...]
    layers: tuple[LayerMerge, ...] = ()
    latency: tuple[OnnxLatency, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "format": self.format, "size_bytes": self.size_bytes,
            "max_error": self.max_error, "checked_batches": list(self.checked_batches),
            "layers": [vars(layer) for layer in self.layers],
            "latency": [{**vars(t), "speedup": t.speedup} for t in self.latency],
        }


def _dense_method(module: nn.Module) -> Callable[[], nn.Module] | None:
    for attr in _TO_DENSE:
        method = getattr(module, attr, None)
        if callable(method):
            return method
    return None


def _factorized(model: nn.Module) -> list[str]:
    """Qualified names of the factorized layers recorded in the model's metadata that exist, outermost only."""
    names = []
    for name in get_meta(model)["layers"]:
        try:
            module = get_submodule(model, name)
        except (AttributeError, ValueError):
            continue
        if _dense_method(module) is not None:
            names.append(name)
    # a layer inside another factorized layer (the q/k/v of a factorized attention) is merged with it
    return [n for n in names if not any(n.startswith(outer + ".") for outer in names)]


def _layer_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, tuple[Any, ...]]:
    """The positional inputs each named layer receives when ``model(x)`` runs."""
    seen: dict[str, tuple[Any, ...]] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple[Any, ...], *, _name: str = name) -> None:
            seen.setdefault(_name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

        handles.append(get_submodule(model, name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _time_ms(module: nn.Module, args: tuple[Any, ...], min_run_time: float) -> float:
    from torch.utils import benchmark

    with torch.no_grad():
        module(*args)
        timer = benchmark.Timer(stmt="module(*args)", globals={"module": module, "args": args},
                                num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def merge_to_dense(
    model: nn.Module,
    *,
    merge: Literal["all", "slower"] = "all",
    example_input: torch.Tensor | None = None,
    min_run_time: float = 0.2,
) -> tuple[nn.Module, tuple[LayerMerge, ...]]:
    """A copy of ``model`` with factorized layers merged back into dense ones.

    Parameters
    ----------
    model : nn.Module
        A compressed model (its ``ttcompress_meta`` names the factorized layers).
    merge : {"all", "slower"}
        ``"all"`` merges every factorized layer; ``"slower"`` only those whose factorized form is
        slower than the merged layer on the input that ``example_input`` gives them (eval mode,
        no grad, timed with :mod:`torch.utils.benchmark`).
    example_input : Tensor, optional
        Needed for ``merge="slower"``.
    min_run_time : float
        Seconds of timing per layer and form.

    Returns
    -------
    (nn.Module, tuple of LayerMerge)
        The new model (eval mode, metadata updated) and what happened to each layer.
    """
    if merge not in ("all", "slower"):
        raise UserInputError(f"merge must be 'all' or 'slower', got {merge!r}")
    if merge == "slower" and example_input is None:
        raise UserInputError("merge='slower' needs example_input to time the layers")
    new = copy.deepcopy(model).eval()
    names = _factorized(new)
    inputs = _layer_inputs(new, names, example_input) if merge == "slower" else {}
    meta_layers = dict(get_meta(new)["layers"])
    done: list[LayerMerge] = []
    root = new
    for name in names:
        layer = get_submodule(root, name)
        dense = _dense_method(layer)().eval()  # type: ignore[misc]
        if merge == "slower":
            if name not in inputs:  # not reached by the forward: nothing to gain either way
                done.append(LayerMerge(name, merged=False))
                continue
            fact_ms = _time_ms(layer, inputs[name], min_run_time)
            dense_ms = _time_ms(dense, inputs[name], min_run_time)
            if dense_ms >= fact_ms:
                done.append(LayerMerge(name, merged=False, factorized_ms=fact_ms, dense_ms=dense_ms))
                continue
            done.append(LayerMerge(name, merged=True, factorized_ms=fact_ms, dense_ms=dense_ms))
        else:
            done.append(LayerMerge(name, merged=True))
        root = set_submodule(root, name, dense)
        meta_layers.pop(name, None)
    set_meta(root, ModelMeta.from_dict({**get_meta(new), "layers": meta_layers}))
    update_meta(root, info={"merged_to_dense": [m.name for m in done if m.merged]})
    return root.eval(), tuple(done)


#: Tokens per sequence of the example input of a language model that records no input shape.
DEFAULT_TOKENS = 16


def _config_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """One sample's shape read from a transformers config: ``DEFAULT_TOKENS`` token ids for a model
    that takes ``input_ids``, ``(num_channels, image_size, image_size)`` for an image model."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(model, "main_input_name", None) == "input_ids":
        return (DEFAULT_TOKENS,)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int) and size > 0 and channels > 0:
        return (channels, size, size)
    return None


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    else:
        recorded = get_meta(model)["info"].get("input_shape") or _config_input_shape(model)
        if not recorded:
            raise InputError("input_shape", "is unknown: the model does not record it; pass it")
        shape = tuple(int(s) for s in recorded)
    if not shape or any(s <= 0 for s in shape):
        raise InputError("input_shape", f"must be positive sizes, got {shape}")
    return shape


def _inputs(model: nn.Module, shape: tuple[int, ...], batches: Sequence[int]) -> list[torch.Tensor]:
    """Seeded example batches: token ids below the vocabulary for a model that takes them, else floats."""
    dtype = _float_dtype(model)
    xs = [example_input(model, shape, b).cpu() for b in batches]
    return [x.to(dtype) if x.is_floating_point() else x for x in xs]


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype (of its first floating parameter): exports keep it, inputs match it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


#: Smallest accepted relative error of a half-precision export (float16 has ~3 significant digits).
_HALF_ATOL = 1e-2


def _tolerance(model: nn.Module, atol: float) -> float:
    return max(atol, _HALF_ATOL) if _float_dtype(model).itemsize < 4 else atol


def _max_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude (at least 1)."""
    scale = max(float(reference.abs().max()), 1.0)
    return float((reference.double() - got.double()).abs().max()) / scale


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress on stdout and warn a lot; results go to stdout, so silence them."""
    with contextlib.redirect_stdout(sys.stderr if os.environ.get("TTCOMPRESS_VERBOSE_EXPORT") else io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


#: Names of a transformers model's main inputs, as the ecosystem (optimum, onnxruntime) names them.
_HF_INPUTS = ("input_ids", "pixel_values", "input_values", "input_features")


@dataclass(frozen=True)
class _OnnxSignature:
    """What the ONNX graph takes and gives: input names (the main one first), output name, and
    whether the second axis is a sequence (token models: dynamic)."""

    inputs: tuple[str, ...]
    output: str
    tokens: bool
    structured: bool


def _onnx_signature(model: nn.Module, sample_output: Any) -> _OnnxSignature:
    main = getattr(model, "main_input_name", None)
    name = main if main in _HF_INPUTS else "input"
    tokens = name == "input_ids"
    try:
        takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_mask = False
    structured = not isinstance(sample_output, torch.Tensor)
    output = "output"
    if structured:
        output = next((key for key in ("logits", "last_hidden_state") if getattr(sample_output, key, None) is not None),
                      "output")
    return _OnnxSignature((name, "attention_mask") if tokens and takes_mask else (name,), output, tokens, structured)


class _OnnxGraph(nn.Module):
    """The model as the ONNX graph computes it: the main input (and ``attention_mask``), one output."""

    def __init__(self, model: nn.Module, signature: _OnnxSignature) -> None:
        super().__init__()
        self.model, self.structured = model, signature.structured

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x) if attention_mask is None else self.model(x, attention_mask=attention_mask)
        return primary_output(out) if self.structured else out


def _onnx_feeds(model: nn.Module, shape: tuple[int, ...], batch_size: int, signature: _OnnxSignature
                ) -> list[tuple[torch.Tensor, ...]]:
    """Two example inputs: batch sizes N and N+2, and for token models two sequence lengths (the
    second one, traced, has both axes above 1 so that neither is specialized into a constant)."""
    if not signature.tokens:
        return [(x,) for x in _inputs(model, shape, (batch_size, batch_size + 2))]
    length = shape[0]
    feeds = []
    for batch, seq in ((batch_size, length), (batch_size + 2, length // 2 if length >= 4 else length + 2)):
        ids = example_input(model, (seq, *shape[1:]), batch).cpu()
        if len(signature.inputs) == 1:
            feeds.append((ids,))
            continue
        mask = torch.ones_like(ids)
        mask[0, -1] = 0  # one padded position: the mask must reach the graph
        feeds.append((ids, mask))
    return feeds


def _onnx_bytes(graph: nn.Module, example: tuple[torch.Tensor, ...], signature: _OnnxSignature) -> bytes:
    axes = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} if signature.tokens else {0: torch.export.Dim.AUTO}
    with _quiet(), keep_factors():
        try:
            program = torch.onnx.export(graph, example, dynamo=True, dynamic_shapes=tuple(axes for _ in example),
                                        input_names=list(signature.inputs), output_names=[signature.output],
                                        verbose=False)
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(f"ONNX export failed: {' '.join(str(exc).split())[:300]}") from None
    proto = program.model_proto
    _strip_debug_info(proto.graph)
    _name_dynamic_axes(proto.graph, ("batch", "sequence") if signature.tokens else ("batch",))
    return proto.SerializeToString()


def _name_dynamic_axes(graph: Any, names: Sequence[str]) -> None:
    """Rename the exporter's symbolic sizes (``s77``) of the inputs' leading axes to ``names``
    (``batch``, ``sequence``), wherever the graph uses them, so runtimes and readers see what they are."""
    rename: dict[str, str] = {}
    for value in graph.input:
        for axis, name in zip(value.type.tensor_type.shape.dim, names):
            if axis.dim_param and axis.dim_param not in rename:
                rename[axis.dim_param] = name
    for value in (*graph.input, *graph.output, *graph.value_info):
        for axis in value.type.tensor_type.shape.dim:
            if axis.dim_param in rename:
                axis.dim_param = rename[axis.dim_param]


def _strip_debug_info(graph: Any) -> None:
    """Drop the exporter's per-node debug records (stack traces, FX node names): in a compressed
    model they can outweigh the factors themselves. The computation is untouched."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _strip_debug_info(sub)


def _run_onnx(data: bytes, feeds: Sequence[tuple[torch.Tensor, ...]], names: Sequence[str]) -> list[torch.Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(f"checking an ONNX export needs onnxruntime: {EXPORT_EXTRA}, "
                          "or skip the check (check=False)") from None
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return [torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, feed)})[0]) for feed in feeds]
    except Exception as exc:  # onnxruntime's own error types
        raise ExportError(f"the ONNX export does not run in onnxruntime: {' '.join(str(exc).split())[:200]}") from None


def _ort_session(data: bytes) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(f"timing an ONNX export needs onnxruntime: {EXPORT_EXTRA}") from None
    return onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])


def onnx_latency(model: nn.Module, data: bytes, shape: tuple[int, ...], batch_sizes: Sequence[int], *,
                 min_run_time: float = 0.5) -> tuple[OnnxLatency, ...]:
    """onnxruntime latency of the graph ``data`` beside the dense-merged graph of ``model``.

    The dense graph (every factorized layer merged back, :func:`merge_to_dense`) is exported the
    same way; both run in onnxruntime's CPU provider on the same inputs, timed in turn over the same
    rounds (:func:`ttcompress.report.measure.time_interleaved`), so the ratio holds under a changing load.
    """
    from ttcompress.report.measure import time_interleaved

    with torch.no_grad():
        signature = _onnx_signature(model, model(_inputs(model, shape, (2,))[0]))
        feeds = _onnx_feeds(model, shape, 2, signature)
        dense = _onnx_bytes(_OnnxGraph(merge_to_dense(model)[0], signature).eval(), feeds[1], signature)
    ours, theirs = _ort_session(data), _ort_session(dense)
    rows = []
    for batch in batch_sizes:
        feed = {n: t.numpy() for n, t in zip(signature.inputs, _onnx_feeds(model, shape, batch, signature)[0])}
        a, b = time_interleaved([lambda s=ours: s.run(None, feed), lambda s=theirs: s.run(None, feed)],
                                min_run_time=min_run_time)
        rows.append(OnnxLatency(batch, a.median_ms, a.iqr_ms, b.median_ms, b.iqr_ms, len(dense)))
    return tuple(rows)


def _export_onnx(model: nn.Module, shape: tuple[int, ...], batch_size: int, *, fold: bool, check: bool,
                 atol: float) -> tuple[bytes, float | None, tuple[int, ...]]:
    """The ONNX bytes (factors kept unless ``fold``), checked in onnxruntime: (bytes, error, batches)."""
    with torch.no_grad():
        try:
            signature = _onnx_signature(model, model(_inputs(model, shape, (2,))[0]))
            feeds = _onnx_feeds(model, shape, batch_size, signature)
            reference = _OnnxGraph(model, signature).eval()
            expected = [reference(*feed) for feed in feeds]
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ExportError(f"the model does not run on inputs of shape {list(shape)}: "
                              f"{' '.join(str(exc).split())[:200]}") from None
        except UserInputError:
            raise ExportError(_ONE_TENSOR) from None
        graph = _OnnxGraph(merge_to_dense(model)[0] if fold else model, signature).eval()
        data = _onnx_bytes(graph, feeds[1], signature)
    if not check:
        return data, None, ()
    got = _run_onnx(data, feeds, signature.inputs)
    return data, _checked_error(expected, got, "onnx", atol), tuple(feed[0].shape[0] for feed in feeds)


def _torchscript_bytes(model: nn.Module, x: torch.Tensor) -> tuple[bytes, Any]:
    with _quiet(), keep_factors():
        try:
            traced = torch.jit.trace(model, (x,), check_trace=False)
        except Exception as exc:
            raise ExportError(f"TorchScript trace failed: {' '.join(str(exc).split())[:300]}") from None
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue(), traced


def _require(modules: Sequence[str], what: str) -> None:
    """ExportError naming the extra when one of ``modules`` cannot be imported (checked before any work)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"{what} needs the optional package{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}: {EXPORT_EXTRA}")


def require_onnx(*, check: bool = True) -> None:
    """:class:`ExportError` naming the ``[export]`` extra when ONNX export (and, with ``check``, its
    onnxruntime check) cannot run here: a caller may ask before it loads the model."""
    _require(("onnx", "onnxscript") + (("onnxruntime",) if check else ()), "ONNX export")


_ONE_TENSOR = "export supports models that return one tensor (or a transformers output with logits or last_hidden_state)"


def _reference_outputs(model: nn.Module, xs: Sequence[torch.Tensor], shape: Sequence[int]
                       ) -> tuple[list[torch.Tensor], bool]:
    """``model``'s outputs on ``xs`` (no grad), and whether they were single tensors; a structure (a
    transformers ``ModelOutput``) gives its primary tensor. ExportError unless it runs and has one."""
    with torch.no_grad():
        try:
            outs = [model(x) for x in xs]
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ExportError(f"the model does not run on inputs of shape {list(shape)}: "
                              f"{' '.join(str(exc).split())[:200]}") from None
    single = all(isinstance(y, torch.Tensor) for y in outs)
    try:
        return (outs if single else [primary_output(y) for y in outs]), single
    except UserInputError:
        raise ExportError(_ONE_TENSOR) from None


class _PrimaryOutput(nn.Module):
    """A model whose output is a structure (a transformers ``ModelOutput``), exported as the tensor
    the rest of ttcompress reads from it: ``logits``, else ``last_hidden_state``, else the first."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return primary_output(self.model(x))


def _export_hf(model: nn.Module, dest: Path, *, fold: bool, merge: Literal["all", "slower"],
               input_shape: Sequence[int] | None, batch_size: int, check: bool, atol: float, overwrite: bool,
               source_dir: str | os.PathLike[str] | None) -> ExportResult:
    """A Hugging Face directory; with ``fold``, of the model merged back to its own transformers class
    (``Conv1D`` layers restored), checked against ``model`` on example inputs before it is written."""
    if recorded_hf_arch(model) is None:
        raise ExportError(f"format 'hf' writes Hugging Face (transformers) models only; this model is a "
                          f"{type(model).__name__}: use onnx, torchscript or dense")
    layers: tuple[LayerMerge, ...] = ()
    error: float | None = 0.0 if check else None
    batches: tuple[int, ...] = ()
    written = model
    if fold:
        batches = (batch_size, batch_size + 2)
        shape = _input_shape(model, input_shape)
        xs = _inputs(model, shape, batches) if check or merge == "slower" else []
        written, layers = merge_to_dense(model, merge=merge, example_input=xs[0] if xs else None)
        restore_conv1d(written)
        if check:
            error = _checked_error(_reference_outputs(model, xs, shape)[0],
                                   _reference_outputs(written, xs, shape)[0], "dense", atol)
    save_hf_dir(written, dest, overwrite=overwrite, check=check, source_dir=source_dir)
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    return ExportResult(dest, "dense" if fold else "hf", size, error, batches if check else (), layers)


def _checked_error(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor], fmt: str, atol: float) -> float:
    """The largest relative error of ``got``; ExportError when it exceeds ``atol``."""
    error = max(_max_error(e, g) for e, g in zip(expected, got))
    if not error <= atol:
        raise ExportError(f"the {fmt} export does not reproduce the model: relative error {error:.2e} > {atol:g}")
    return error


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: ExportFormat,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    merge: Literal["all", "slower"] = "all",
    check: bool = True,
    atol: float = 1e-4,
    overwrite: bool = False,
    fold: bool = False,
    source_dir: str | os.PathLike[str] | None = None,
    latency_batches: Sequence[int] = (),
) -> ExportResult:
    """Export ``model`` to ``path`` in ``format``, checked against the model first.

    Parameters
    ----------
    model : nn.Module
        Any model; compressed models keep their factorized layers (``onnx``/``torchscript``) or
        have them merged (``dense``).
    path : str or PathLike
        Output file (written atomically, only after the check passed); for ``hf`` a directory,
        which must not exist unless ``overwrite``.
    format : {"onnx", "torchscript", "dense", "hf"}
        See the module docstring. ``dense`` writes a ttcompress checkpoint (safetensors) whose
        tensors are the dense architecture's state dict; ``hf`` a Hugging Face directory
        (transformers models only; ``input_shape`` and ``batch_size`` do not apply).
    input_shape : sequence of int, optional
        One sample's shape (without the batch dimension); default: the shape the model records.
    batch_size : int
        Batch size of the example input the export is traced with (and of the timing for
        ``merge="slower"``).
    merge : {"all", "slower"}
        For ``dense`` only: merge every factorized layer, or only those measured slower.
    check : bool
        Run the exported model at two batch sizes and compare with ``model``.
    atol : float
        Largest accepted difference, relative to the output's largest magnitude.
    overwrite : bool
        For ``hf``: replace an existing directory (the other formats replace files; the CLI
        asks for ``--overwrite`` first).
    fold : bool
        Merge every factorized layer back to dense before exporting (``onnx``, ``torchscript``,
        ``hf``): the graph or directory of the original architecture. ``dense`` always merges.
    source_dir : str or PathLike, optional
        For ``hf``: the Hugging Face directory the model was read from; its tokenizer,
        ``generation_config.json`` and other plain files are copied into the new directory.
    latency_batches : sequence of int
        For ``onnx``: time the written graph in onnxruntime at these batch sizes beside the
        dense-merged graph of the same model (:func:`onnx_latency`; ``ExportResult.latency``).

    Returns
    -------
    ExportResult
    """
    if format not in EXPORT_FORMATS:
        raise UserInputError(f"format must be one of {', '.join(EXPORT_FORMATS)}; got {format!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if merge != "all" and format != "dense":
        raise UserInputError(f"merge applies to format='dense' only, got format={format!r}")
    if latency_batches and format != "onnx":
        raise UserInputError(f"latency_batches applies to format='onnx' only, got format={format!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in latency_batches):
        raise UserInputError(f"latency_batches must be positive integers, got {list(latency_batches)!r}")
    if format == "onnx":
        require_onnx(check=check)
    model = model.eval()
    atol = _tolerance(model, atol)
    if format == "hf" or (format == "dense" and recorded_hf_arch(model) is not None):
        # a transformers model merged back to dense is a plain Hugging Face directory
        return _export_hf(model, Path(path), fold=fold or format == "dense", merge=merge, input_shape=input_shape,
                          batch_size=batch_size, check=check, atol=atol, overwrite=overwrite, source_dir=source_dir)
    shape = _input_shape(model, input_shape)
    dest = Path(path)
    if format == "onnx":
        data, error, checked = _export_onnx(model, shape, batch_size, fold=fold, check=check, atol=atol)
        timed = onnx_latency(model, data, shape, latency_batches) if latency_batches else ()
        with atomic_write(dest, "wb") as f:
            f.write(data)
        return ExportResult(dest, format, dest.stat().st_size, error, checked, latency=timed)
    batches = (batch_size, batch_size + 2)
    xs = _inputs(model, shape, batches)
    expected, single = _reference_outputs(model, xs, shape)
    reference = model
    if fold and format != "dense":
        model = merge_to_dense(model)[0]
    if not single and format != "dense":
        model = _PrimaryOutput(model)  # ONNX and TorchScript graphs output the one tensor
    # torch.export specializes a batch of 1 into a constant: trace with at least 2.
    example = xs[0] if batch_size > 1 else xs[1]

    layers: tuple[LayerMerge, ...] = ()
    with torch.no_grad():
        if format == "torchscript":
            data, traced = _torchscript_bytes(model, example)
            got = [traced(x) for x in xs] if check else []
        else:
            merged, layers = merge_to_dense(reference, merge=merge, example_input=xs[0])  # time at batch_size
            data = b""
            got = _reference_outputs(merged, xs, shape)[0] if check else []
    error = _checked_error(expected, got, format, atol) if check else None
    if format == "dense":
        save(merged, dest)
    else:
        with atomic_write(dest, "wb") as f:
            f.write(data)
    return ExportResult(dest, format, dest.stat().st_size, error, batches if check else (), layers)
