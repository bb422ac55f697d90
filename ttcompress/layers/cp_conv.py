"""``CPConv2d``: a Conv2d whose kernel is a rank-R CP tensor, evaluated as small convolutions.

With ``K[o, c, y, x] = sum_r U_out[o, r] U_in[c, r] U_kh[y, r] U_kw[x, r]`` (Lebedev et al. 2015)
the convolution ``y = K * x + b`` factors into (per group)::

    z1 = conv1x1(x,  U_in^T)            C_in -> R        (pointwise)
    z2 = depthwise conv (kh x 1) of z1  with U_kh        (stride/dilation/padding along H)
    z3 = depthwise conv (1 x kw) of z2  with U_kw        (stride/dilation/padding along W)
    y  = conv1x1(z3, U_out) + b         R -> C_out       (pointwise)

The two depthwise convolutions are one depthwise ``kh x kw`` convolution whose per-channel filter
is the rank-1 outer product ``U_kh[:, r] U_kw[:, r]^T`` -- the same numbers, one pass over memory.
Which of the two evaluations runs is chosen per layer shape (see :attr:`CPConv2d.fuse_spatial`);
both are exact. When one convolution with the reconstructed kernel is cheaper (small layers, or
shapes where the factorized passes run slowly), ``forward`` uses it instead (see
:attr:`CPConv2d.evaluation`); in eval mode without gradients that kernel is cached.

References
----------
.. [1] V. Lebedev, Y. Ganin, M. Rakhuba, I. Oseledets, V. Lempitsky, "Speeding-up Convolutional
       Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015. arXiv:1412.6553.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttcompress.decompose.cp import cp_als, cp_param_count
from ttcompress.layers._conv_args import conv_pair, positive_int
from ttcompress.layers._autograd import plain_ops_only
from ttcompress.layers._cp_kernel import LEAN_MIN_VALUES, cp_kernel_matrix
from ttcompress.layers._export import keeping_factors
from ttcompress.layers._pointwise import nchw_only, pointwise_to_channels_last, pointwise_to_nchw, switches_layout
from ttcompress.layers._weight import DenseWeightAttribute
from ttcompress.layers.cp_eval import clear_choice, dense_wins, path_costs

__all__ = ["CPConv2d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PaddingArg = int | tuple[int, int] | str


def _check_conv(conv: Any, *, rank: Any, label: str) -> None:
    """ValueError unless ``conv`` is an initialized ``nn.Conv2d`` with finite weights and ``rank`` > 0."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(  # noqa: TRY004 -- issue 3 asks for ValueError here
            f"CPConv2d.from_conv needs an nn.Conv2d, got {type(conv).__name__} ({label})"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r} ({label})")
    weight = conv.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(  # noqa: TRY004 -- a bad layer, not a bad argument type
            f"{label} is a lazy conv that has not been initialized yet"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{label} has NaN or Inf weights; cannot decompose it")
    bias = conv.bias
    if bias is not None and not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{label} has NaN or Inf bias values")


def _fit_groups(
    layer: CPConv2d, w: torch.Tensor, *, name: str | None, **cp_options: Any
) -> tuple[float, int]:
    """CP-ALS of each group's kernel block of ``w``, copied into ``layer``'s factors (no grad).

    Returns the summed squared absolute error and the largest iteration count; ``cp_options``
    go to :func:`ttcompress.decompose.cp.cp_als`.
    """
    groups, rank = layer.groups, layer.rank
    out_per_group = layer.out_channels // groups
    sq_err = 0.0
    n_iter = 0
    for g in range(groups):
        block = w[g * out_per_group : (g + 1) * out_per_group]
        group_name = name if groups == 1 else f"{name or 'conv'}[group {g}]"
        cp = cp_als(block, rank=rank, name=group_name, **cp_options)
        u_out, u_in, u_kh, u_kw = cp.factors
        rows = slice(g * rank, (g + 1) * rank)
        layer.out_factor[g * out_per_group : (g + 1) * out_per_group].copy_(u_out)
        layer.in_factor[rows].copy_(u_in.T)
        layer.kh_factor[rows].copy_(u_kh.T)
        layer.kw_factor[rows].copy_(u_kw.T)
        sq_err += (cp.rel_error * float(block.double().norm())) ** 2
        n_iter = max(n_iter, cp.n_iter)
    return sq_err, n_iter


class CPConv2d(DenseWeightAttribute, nn.Module):
    """2-D convolution with a rank-``rank`` CP kernel (per group), run as four small convolutions.

    Parameters
    ----------
    in_channels, out_channels : int
        As in :class:`torch.nn.Conv2d`.
    kernel_size : int or (int, int)
        ``(kh, kw)``.
    rank : int
        CP rank ``R`` (per group), ``R >= 1``.
    stride, padding, dilation, groups, bias, padding_mode, device, dtype
        Exactly as :class:`torch.nn.Conv2d` (``padding`` may be ``"same"`` or ``"valid"``).

    Attributes
    ----------
    in_factor : nn.Parameter
        ``(groups * R, C_in / groups)``: ``U_in^T`` of every group (first pointwise conv).
    kh_factor : nn.Parameter
        ``(groups * R, kh)``: ``U_kh^T`` (depthwise along H).
    kw_factor : nn.Parameter
        ``(groups * R, kw)``: ``U_kw^T`` (depthwise along W).
    out_factor : nn.Parameter
        ``(C_out, R)``: ``U_out`` of every group, stacked (last pointwise conv).
    bias : nn.Parameter or None
        ``(C_out,)``.
    rel_error : float or None
        ``||K - K_hat|| / ||K||`` when built by :meth:`from_conv` (not in the state dict).
    n_iter : int or None
        ALS iterations when built by :meth:`from_conv` (largest over groups).
    fuse_spatial : bool
        Evaluate the two depthwise convolutions as one depthwise ``kh x kw`` convolution with
        the per-channel rank-1 filter (exact). Chosen by shape; may be set by the user.
    channels_last : bool
        Run the chain in ``torch.channels_last`` memory format (faster on CPU for wide layers).
    evaluation : {"auto", "factorized", "dense"}
        ``"auto"`` (default) picks, per input shape, the factorized passes or one convolution with
        the reconstructed kernel: in eval mode without gradients on CPU by timing both once per
        input shape (as ``cudnn.benchmark`` does), otherwise by the cost model
        (:meth:`uses_dense_kernel`). ``"factorized"`` / ``"dense"`` force one evaluation. All are
        exact. In eval mode without gradients the reconstructed kernel is cached; the cache is
        dropped whenever a factor changes (its version counter or storage), on ``.train()`` /
        ``.eval()`` and on ``.to()``.

    Notes
    -----
    Parameters: ``groups * R * (C_in/groups + kh + kw + C_out/groups)`` (+ ``C_out`` bias),
    i.e. ``R (C_in + kh + kw + C_out)`` for ``groups=1``. Multiply-adds per output pixel:
    ``R (C_in + kh + kw + C_out)`` (unfused), against ``C_in kh kw C_out`` for the dense conv
    (per group the same with ``C/groups``). See Lebedev et al. 2015, sec. 3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = conv_pair(kernel_size, "kernel_size", minimum=1)
        self.rank = positive_int(rank, "rank")
        self.stride = conv_pair(stride, "stride", minimum=1)
        self.dilation = conv_pair(dilation, "dilation", minimum=1)
        self.groups = positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"padding must be 'same', 'valid' or ints, got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(
                    "padding='same' is not supported for strided convolutions"
                )
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = conv_pair(padding, "padding", minimum=0)
        # (left, right, top, bottom), the F.pad order, exactly as nn.Conv2d computes it
        self._pad_lrtb = self._explicit_padding()

        factory = {"device": device, "dtype": dtype}
        g, r = self.groups, self.rank
        kh, kw = self.kernel_size
        self.in_factor = nn.Parameter(torch.empty(g * r, in_channels // g, **factory))
        self.kh_factor = nn.Parameter(torch.empty(g * r, kh, **factory))
        self.kw_factor = nn.Parameter(torch.empty(g * r, kw, **factory))
        self.out_factor = nn.Parameter(torch.empty(out_channels, r, **factory))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(out_channels, **factory)
            )
        else:
            self.register_parameter("bias", None)
        self.rel_error: float | None = None
        self.n_iter: int | None = None
        self.fuse_spatial, self.channels_last = self._default_strategy()
        self.evaluation: str = "auto"
        self._kernel_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._eval_choice: dict[tuple[Any, ...], bool] = {}
        self.reset_parameters()

    # ---------------------------------------------------------------- construction helpers

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        kh, kw = self.kernel_size
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            # nn.Conv2d: total d*(k-1), left = total // 2, the extra one on the right/bottom
            th = self.dilation[0] * (kh - 1)
            tw = self.dilation[1] * (kw - 1)
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        ph, pw = self.padding  # type: ignore[misc]
        return (pw, pw, ph, ph)

    def _default_strategy(self) -> tuple[bool, bool]:
        """Pick the evaluation (fused spatial conv, channels_last) from the layer's shape.

        From ``benchmarks/bench_cp_conv.py --variants`` on CPU (docs/benchmarks.md): one fused
        depthwise ``kh x kw`` pass is faster than two 1-D passes when both kh, kw > 1, and
        channels_last is faster at every measured width (64..256 channels, ranks 17..284); for
        very narrow layers the layout copy is not worth it.
        """
        kh, kw = self.kernel_size
        fuse = kh > 1 and kw > 1
        wide = min(self.in_channels, self.out_channels) >= 16
        return fuse, wide

    def reset_parameters(self) -> None:
        """Variance-preserving random init for training from scratch.

        ``nn.Conv2d`` draws weights with variance ``1 / (3 fan_in)``, ``fan_in = C_in/groups *
        kh * kw``. A reconstructed entry is a sum of ``R`` products of four independent zero-mean
        factors, so each factor is drawn from ``N(0, s^2)`` with ``R s^8 = 1 / (3 fan_in)``: the
        kernel then has the same variance as a fresh ``nn.Conv2d``. The bias is as in
        ``nn.Conv2d``.
        """
        kh, kw = self.kernel_size
        fan_in = (self.in_channels // self.groups) * kh * kw
        std = (1.0 / (3.0 * fan_in * self.rank)) ** 0.125
        with torch.no_grad():
            for p in (self.in_factor, self.kh_factor, self.kw_factor, self.out_factor):
                p.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        rank: int,
        n_iter_max: int = 100,
        tol: float = 1e-6,
        init: str = "auto",
        n_restarts: int = 1,
        seed: int = 0,
        name: str | None = None,
    ) -> CPConv2d:
        """Build a CP convolution from a trained ``nn.Conv2d`` by CP-ALS of its kernel.

        Every conv attribute (stride, padding incl. "same"/"valid", dilation, groups, bias,
        padding_mode, dtype, device) is kept. With ``groups > 1`` each group's kernel gets its
        own rank-``rank`` factors, so the layer stays exact in structure.

        Parameters
        ----------
        conv : nn.Conv2d
            Layer to replace (not modified).
        rank : int
            CP rank per group.
        n_iter_max, tol, init, n_restarts, seed
            Passed to :func:`ttcompress.decompose.cp.cp_als`.
        name : str, optional
            Layer name for error messages and warnings.

        Raises
        ------
        ValueError
            ``conv`` is not an ``nn.Conv2d``, ``rank <= 0``, or the weights contain NaN/Inf.
        """
        label = f"layer {name!r}" if name else "layer"
        _check_conv(conv, rank=rank, label=label)
        weight = conv.weight
        bias = conv.bias
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            rank=rank,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=bias is not None,
            padding_mode=conv.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            w = weight.detach()
            sq_err, n_iter = _fit_groups(
                layer, w, name=name, n_iter_max=n_iter_max, tol=tol, init=init, n_restarts=n_restarts, seed=seed
            )
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        total = float(w.double().norm())
        layer.rel_error = math.sqrt(sq_err) / total if total > 0 else 0.0
        layer.n_iter = n_iter
        return layer

    # ---------------------------------------------------------------- conversion / metadata

    def kernel(self) -> torch.Tensor:
        """The reconstructed dense kernel ``(C_out, C_in/groups, kh, kw)`` (differentiable)."""
        g, r = self.groups, self.rank
        kh, kw = self.kernel_size
        cin = self.in_channels // g
        cout = self.out_channels // g
        u_in = self.in_factor.reshape(g, r, cin)
        u_kh = self.kh_factor.reshape(g, r, kh)
        u_kw = self.kw_factor.reshape(g, r, kw)
        u_out = self.out_factor.reshape(g, cout, r)
        spatial = u_kh[:, :, :, None] * u_kw[:, :, None, :]  # (g, r, kh, kw)
        inner = (
            u_in[:, :, :, None, None] * spatial[:, :, None, :, :]
        )  # (g, r, cin, kh, kw)
        k = torch.bmm(u_out, inner.reshape(g, r, -1))  # (g, cout, cin*kh*kw)
        return k.reshape(self.out_channels, cin, kh, kw)

    def dense_weight(self) -> torch.Tensor:
        """The kernel as a ``(C_out, C_in/groups * kh * kw)`` matrix (differentiable).

        Above :data:`~ttcompress.layers._cp_kernel.LEAN_MIN_VALUES` rank-1 terms (``R K``) it is
        built by blocks (:func:`~ttcompress.layers._cp_kernel.cp_kernel_matrix`): the calibrated
        fit's gradient then holds no ``R K`` tensor (issue 25); below, it is ``kernel()``'s.
        """
        g, r = self.groups, self.rank
        kh, kw = self.kernel_size
        cin, cout = self.in_channels // g, self.out_channels // g
        if r * cin * kh * kw <= LEAN_MIN_VALUES:
            return self.kernel().reshape(self.out_channels, -1)
        return cp_kernel_matrix(self.out_factor.reshape(g, cout, r), self.in_factor.reshape(g, r, cin),
                                self.kh_factor.reshape(g, r, kh), self.kw_factor.reshape(g, r, kw)
                                ).reshape(self.out_channels, -1)

    def to_conv(self) -> nn.Conv2d:
        """Return the equivalent ``nn.Conv2d`` (same attributes, reconstructed kernel)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.out_factor.device,
            dtype=self.out_factor.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None and conv.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def config(self) -> dict[str, Any]:
        """JSON-serializable kwargs: ``CPConv2d(**layer.config())`` rebuilds the structure."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "rank": self.rank,
            "stride": list(self.stride),
            "padding": padding,
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
        }

    @property
    def dense_params(self) -> int:
        """Parameters of the equivalent ``nn.Conv2d`` (weight + bias)."""
        kh, kw = self.kernel_size
        weight = self.out_channels * (self.in_channels // self.groups) * kh * kw
        return weight + (self.out_channels if self.bias is not None else 0)

    @property
    def num_params(self) -> int:
        """Own parameter count (factors + bias)."""
        kh, kw = self.kernel_size
        return cp_param_count(
            self.out_channels,
            self.in_channels // self.groups,
            kh,
            kw,
            self.rank,
            self.groups,
            bias=self.bias is not None,
        )

    @property
    def compression_ratio(self) -> float:
        """``dense_params / num_params``."""
        return self.dense_params / self.num_params

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"rank={self.rank}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += (
                f", padding={self.padding!r}"
                if isinstance(self.padding, str)
                else (f", padding={self.padding}")
            )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", params={self.num_params}, ratio={self.compression_ratio:.2f}x"

    # ---------------------------------------------------------------- evaluation choice

    def _output_hw(self, h: int, w: int) -> tuple[int, int]:
        left, right, top, bottom = self._pad_lrtb
        kh, kw = self.kernel_size
        out_h = (h + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return max(out_h, 0), max(out_w, 0)

    def uses_dense_kernel(self, batch: int, height: int, width: int) -> bool:
        """Cost-model choice: evaluate an input ``(batch, C_in, height, width)`` as one dense conv?

        Used in training (and wherever the eval-mode choice is not measured); the cost model is
        :func:`ttcompress.layers.cp_eval.path_costs`. ``evaluation`` other than ``"auto"``
        overrides it.
        """
        if self.evaluation != "auto":
            return self.evaluation == "dense"
        dense, factorized = self._path_costs(batch, height, width)
        return factorized > dense

    def _path_costs(self, batch: int, height: int, width: int) -> tuple[float, float]:
        """:func:`~ttcompress.layers.cp_eval.path_costs` of an input ``(batch, C_in, height, width)``."""
        return path_costs(
            batch=batch,
            height=height,
            width=width,
            out_hw=self._output_hw(height, width),
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            groups=self.groups,
            rank=self.rank,
            kernel_size=self.kernel_size,
        )

    def _measured_dense(self, x: torch.Tensor) -> bool:
        """Eval-mode choice for this input's shape, made once and remembered.

        The key is the input's shape, dtype, device and memory format. On a large input where the
        cost model is clear (:func:`~ttcompress.layers.cp_eval.clear_choice`) it decides. Otherwise
        each path is timed
        :data:`~ttcompress.layers.cp_eval.TIMING_ROUNDS` times, interleaved, over enough calls to
        take :data:`~ttcompress.layers.cp_eval.TIMING_MIN_SECONDS`; the factorized chain is kept
        only when its best time beats the dense kernel's by :data:`~ttcompress.layers.cp_eval.
        FACTORIZED_MARGIN`, so a close call (where timing noise decides) runs the same convolution
        as ``nn.Conv2d``.
        """
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
        choice = self._eval_choice.get(key)
        if choice is None:  # a clear call of the cost model on a large input: no timing, no kernel built
            choice = clear_choice(*self._path_costs(x.shape[0] if x.dim() == 4 else 1, x.shape[-2], x.shape[-1]))
            if choice is not None:
                self._eval_choice[key] = choice
        if choice is None:
            kernel = self._cached_kernel()
            choice = dense_wins(lambda: self._dense_forward(x, kernel), lambda: self._factorized_forward(x))
            self._eval_choice[key] = choice
        return choice

    def _cached_kernel(self) -> torch.Tensor:
        """The reconstructed kernel, rebuilt only when a factor has changed since the last call."""
        params = self._parameters
        key = tuple((p._version, p.data_ptr()) for p in (params["in_factor"], params["kh_factor"],
                                                          params["kw_factor"], params["out_factor"]))
        cache = self._kernel_cache
        if cache is None or cache[0] != key:
            cache = self._kernel_cache = (key, self.kernel().detach())
        return cache[1]

    def train(self, mode: bool = True) -> CPConv2d:
        self._kernel_cache = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> CPConv2d:
        self._kernel_cache = None  # .to() / .half() / .cuda(): new storages, drop the old kernel
        self._eval_choice = {}
        return super()._apply(fn, recurse)

    def _dense_forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_lrtb, mode=self.padding_mode)
            padding: tuple[int, int] | str = (0, 0)
        else:
            padding = self.padding
        return F.conv2d(x, kernel, self.bias, self.stride, padding, self.dilation, self.groups)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() in (3, 4) and x.shape[-3] == self.in_channels:
            batch = x.shape[0] if x.dim() == 4 else 1
            # not while tracing or compiling: a traced graph would hold the cached dense kernel as a constant
            # (a TorchScript file the size of the dense model); the graph computes from the factors
            inference = not (self.training or torch.is_grad_enabled() or plain_ops_only())
            if inference and self.evaluation == "auto" and x.device.type == "cpu":
                dense = self._measured_dense(x)  # one dict lookup once this input shape was timed
            else:
                dense = self.uses_dense_kernel(batch, x.shape[-2], x.shape[-1])
            if dense and not keeping_factors():
                return self._dense_forward(x, self._cached_kernel() if inference else self.kernel())
        return self._factorized_forward(x)

    def _factorized_forward(self, x: torch.Tensor) -> torch.Tensor:
        g, r = self.groups, self.rank
        gr = g * r
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        # Run the chain in channels_last when that is faster, but hand back the memory format
        # nn.Conv2d would (that of the input), so code such as ``out.view(n, -1)`` keeps working.
        # For an NCHW input the two pointwise passes change the layout as they go (matmuls that
        # read their operand transposed), so neither the tensors nor their gradients are copied.
        # Small maps (fewer than SWITCH_MIN_POSITIONS positions) run in NCHW as they come.
        nchw = g == 1 and nchw_only(x)
        switch = self.channels_last and nchw and switches_layout(x)
        restore = (self.channels_last and not nchw and x.dim() == 4
                   and not x.is_contiguous(memory_format=torch.channels_last))
        if restore:
            x = x.contiguous(memory_format=torch.channels_last)
        # 1) pointwise C_in -> G*R (no bias, so zero padding commutes with it)
        if switch:
            z = pointwise_to_channels_last(x, self.in_factor)
        else:
            z = F.conv2d(x, self.in_factor[:, :, None, None], groups=g)
        # 2) padding: the zero case symmetric goes into the convs; everything else explicitly,
        #    exactly as nn.Conv2d does (F.pad with its (left, right, top, bottom) amounts)
        left, right, top, bottom = self._pad_lrtb
        if self.padding_mode != "zeros":
            if left or right or top or bottom:
                z = F.pad(z, self._pad_lrtb, mode=self.padding_mode)
            ph = pw = 0
        elif left == right and top == bottom:
            ph, pw = top, left
        else:
            z = F.pad(z, self._pad_lrtb)
            ph = pw = 0
        # 3) spatial: one depthwise kh x kw pass with rank-1 filters, or two 1-D passes
        if self.fuse_spatial and not keeping_factors():  # exported: the two 1-D factors, not their product
            spatial = (self.kh_factor[:, :, None] * self.kw_factor[:, None, :])[:, None]
            z = F.conv2d(
                z,
                spatial,
                stride=(sh, sw),
                padding=(ph, pw),
                dilation=(dh, dw),
                groups=gr,
            )
        else:
            if kh > 1 or sh > 1 or ph > 0:
                z = F.conv2d(
                    z,
                    self.kh_factor[:, None, :, None],
                    stride=(sh, 1),
                    padding=(ph, 0),
                    dilation=(dh, 1),
                    groups=gr,
                )
            else:
                z = z * self.kh_factor[:, 0].reshape(1, gr, 1, 1)
            if kw > 1 or sw > 1 or pw > 0:
                z = F.conv2d(
                    z,
                    self.kw_factor[:, None, None, :],
                    stride=(1, sw),
                    padding=(0, pw),
                    dilation=(1, dw),
                    groups=gr,
                )
            else:
                z = z * self.kw_factor[:, 0].reshape(1, gr, 1, 1)
        # 4) pointwise G*R -> C_out with the bias
        if switch:
            return pointwise_to_nchw(z, self.out_factor, self.bias)
        out = F.conv2d(z, self.out_factor[:, :, None, None], self.bias, groups=g)
        return out.contiguous() if restore else out
