"""``Tucker2Conv2d``: a Conv2d factored as 1x1 -> kh x kw core -> 1x1 (Kim et al. 2016).

With ``K[o, c] = sum_{a, b} U[o, a] G[a, b] V[c, b]`` (:mod:`ttcompress.decompose.tucker2`), per
group::

    z1 = conv1x1(x, V^T)          C_in -> R_in     (no bias)
    z2 = conv_kxk(z1, G)          R_in -> R_out    (stride, padding, padding_mode, dilation)
    y  = conv1x1(z2, U) + b       R_out -> C_out

Padding of any mode commutes with a bias-free pointwise map (it copies or zeroes whole pixels),
so the core convolution takes the original layer's padding, stride and dilation unchanged and
the factorization is exact at full rank. Each stage is a plain ``nn.Conv2d`` (``first``,
``core``, ``last``), so every padding form ``nn.Conv2d`` accepts is reproduced by construction.
With ``groups > 1`` every group has its own factors (ranks are per group).

References
----------
.. [1] Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang, D. Shin, "Compression of Deep Convolutional
       Neural Networks for Fast and Low Power Mobile Applications", ICLR 2016. arXiv:1511.06530.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ttcompress.decompose.tucker2 import tucker2, tucker2_param_count, tucker2_reconstruct
from ttcompress.layers._autograd import plain_ops_only
from ttcompress.layers._export import keeping_factors
from ttcompress.layers._pointwise import pointwise_to_channels_last, pointwise_to_nchw, switches_layout
from ttcompress.layers._weight import DenseWeightAttribute
from ttcompress.layers.cp_eval import dense_wins

__all__ = ["Tucker2Conv2d"]


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (which a direct matmul would skip)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class Tucker2Conv2d(DenseWeightAttribute, nn.Module):
    """Tucker-2 factored ``nn.Conv2d``.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode
        As ``nn.Conv2d``.
    in_rank, out_rank : int
        Ranks per group of the input and output channel modes (at most ``C_in/groups`` and
        ``C_out/groups``).
    device, dtype : optional
        Factory arguments.

    Notes
    -----
    In eval mode without gradients on CPU the layer times, once per input shape, its three
    convolutions against one convolution with the reconstructed kernel (cached until a weight
    changes) and keeps the faster (see :func:`ttcompress.layers.cp_eval.dense_wins`); both are exact.
    The attribute ``evaluation`` (``"auto"``, ``"factorized"``, ``"dense"``; not saved) forces one of
    the two there (FLOP counting sets ``"factorized"``).

    Parameters: ``C_in R_in + groups R_out R_in kh kw + C_out R_out`` (+ bias). Multiply-adds per
    output pixel: the same, with the first term times ``stride`` area (it runs before the stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        in_rank: int,
        out_rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_rank", in_rank), ("out_rank", out_rank), ("groups", groups),
                        ("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if in_rank > in_channels // groups or out_rank > out_channels // groups:
            raise ValueError(f"in_rank/out_rank must be <= channels per group ({in_channels // groups}, "
                             f"{out_channels // groups}), got {in_rank}, {out_rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.in_rank, self.out_rank = in_rank, out_rank
        self.first = nn.Conv2d(in_channels, groups * in_rank, 1, groups=groups, bias=False, **factory)
        self.core = nn.Conv2d(groups * in_rank, groups * out_rank, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode, **factory)
        self.last = nn.Conv2d(groups * out_rank, out_channels, 1, groups=groups, bias=bias, **factory)
        self.rel_error: float | None = None
        self._kernel_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None
        self._eval_choice: dict[tuple[Any, ...], bool] = {}
        self.evaluation: str = "auto"

    # ---- the wrapped nn.Conv2d's attributes --------------------------------------------------------
    @property
    def kernel_size(self) -> tuple[int, int]:
        return _pair(self.core.kernel_size)

    @property
    def stride(self) -> tuple[int, int]:
        return _pair(self.core.stride)

    @property
    def padding(self) -> tuple[int, int] | str:
        p = self.core.padding
        return p if isinstance(p, str) else _pair(p)

    @property
    def dilation(self) -> tuple[int, int]:
        return _pair(self.core.dilation)

    @property
    def padding_mode(self) -> str:
        return self.core.padding_mode

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, in_rank: int, out_rank: int, n_iter_max: int = 10,
                  tol: float = 1e-8) -> Tucker2Conv2d:
        """Build from a trained ``nn.Conv2d`` by Tucker-2 (HOSVD + HOOI) of each group's kernel.

        Every conv attribute (stride, padding incl. "same"/"valid", padding_mode, dilation,
        groups, bias, device, dtype) is kept. Ranks are capped at the ranks of the kernel's
        unfoldings (channels per group, or fewer for a 1x1 kernel).
        ``rel_error`` is set to the relative error of the whole kernel.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        g = conv.groups
        w = conv.weight.detach()
        cout_g, cin_g = conv.out_channels // g, conv.in_channels // g
        kh, kw = conv.kernel_size
        r_in, r_out = min(in_rank, cin_g, cout_g * kh * kw), min(out_rank, cout_g, cin_g * kh * kw)
        firsts, cores, lasts = [], [], []
        err2 = 0.0
        for i in range(g):
            part = w[i * cout_g:(i + 1) * cout_g]
            dec = tucker2(part, out_rank=r_out, in_rank=r_in, n_iter_max=n_iter_max, tol=tol)
            firsts.append(dec.in_factor.T)
            cores.append(dec.core)
            lasts.append(dec.out_factor)
            err2 += (dec.rel_error ** 2) * float(part.double().square().sum())
        # The decomposition caps each rank further at what the other mode leaves (a 1x1 kernel's
        # output rank is at most its input rank): size the layer by the ranks it returned.
        r_out, r_in = int(cores[0].shape[0]), int(cores[0].shape[1])
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, in_rank=r_in, out_rank=r_out,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=g,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(torch.cat(firsts)[:, :, None, None])
            layer.core.weight.copy_(torch.cat(cores))
            layer.last.weight.copy_(torch.cat(lasts)[:, :, None, None])
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias)  # type: ignore[union-attr]
        total = float(w.double().square().sum())
        layer.rel_error = (err2 / total) ** 0.5 if total > 0 else 0.0
        return layer

    def kernel(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in/groups, kh, kw)`` (differentiable)."""
        g = self.groups
        parts = []
        for i in range(g):
            v = self.first.weight[i * self.in_rank:(i + 1) * self.in_rank, :, 0, 0].T
            core = self.core.weight[i * self.out_rank:(i + 1) * self.out_rank]
            u = self.last.weight[i * (self.out_channels // g):(i + 1) * (self.out_channels // g), :, 0, 0]
            parts.append(tucker2_reconstruct(core, u, v))
        return torch.cat(parts)

    def dense_weight(self) -> torch.Tensor:
        """The kernel as a ``(C_out, C_in/groups * kh * kw)`` matrix (differentiable), the form
        :func:`ttcompress.calibration.reconstruct.dense_weight` works with."""
        return self.kernel().reshape(self.out_channels, -1)

    def to_conv(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (same attributes, reconstructed kernel)."""
        w = self.core.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.kernel())
            if self.bias is not None:
                conv.bias.copy_(self.bias)  # type: ignore[union-attr]
        return conv

    def config(self) -> dict[str, Any]:
        """JSON-serializable kwargs: ``Tucker2Conv2d(**layer.config())`` rebuilds the structure."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "in_rank": self.in_rank, "out_rank": self.out_rank,
                "stride": list(self.stride), "padding": padding, "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias is not None, "padding_mode": self.padding_mode}

    @property
    def num_params(self) -> int:
        kh, kw = self.kernel_size
        return tucker2_param_count(self.out_channels, self.in_channels, kh, kw, self.out_rank, self.in_rank,
                                   groups=self.groups) + (self.out_channels if self.bias is not None else 0)

    @property
    def flops(self) -> int:
        """Multiply-adds per output pixel (the first 1x1 runs on ``stride`` area more pixels)."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        return (self.in_channels * self.in_rank * sh * sw + self.groups * self.out_rank * self.in_rank * kh * kw
                + self.out_channels * self.out_rank)

    def _cached_kernel(self) -> torch.Tensor:
        """The reconstructed kernel, rebuilt only when a weight has changed since the last call."""
        key = tuple((w._version, w.data_ptr()) for w in (self.first.weight, self.core.weight, self.last.weight))
        cache = self._kernel_cache
        if cache is None or cache[0] != key:
            cache = self._kernel_cache = (key, self.kernel().detach())
        return cache[1]

    def train(self, mode: bool = True) -> Tucker2Conv2d:
        self._kernel_cache = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> Tucker2Conv2d:
        self._kernel_cache = None  # .to() / .half(): new storages, drop the old kernel
        self._eval_choice = {}
        return super()._apply(fn, recurse)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        # the core conv holds the original stride, padding (and mode), dilation and groups
        return self.core._conv_forward(x, self._cached_kernel(), self.last.bias)

    def _factorized_forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.groups == 1 and self.kernel_size != (1, 1) and switches_layout(x)
                and not (_hooked(self.first) or _hooked(self.last))):
            # NCHW input: the pointwise passes switch to channels_last and back as they multiply,
            # so the core conv runs channels_last (faster on CPU) without copying x, y or their
            # gradients (measured in docs/benchmarks.md). Same arithmetic as the two 1x1 convs.
            # Not for a 1x1 core: nothing spatial to gain, and oneDNN's backward of a strided 1x1
            # conv on channels_last input corrupts the heap for some odd channel counts (torch
            # 2.14 CPU: 7 -> 9 channels, stride 2).
            z = pointwise_to_channels_last(x, self.first.weight[:, :, 0, 0])
            return pointwise_to_nchw(self.core(z), self.last.weight[:, :, 0, 0], self.last.bias)
        return self.last(self.core(self.first(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not while tracing or compiling: a traced graph would hold the cached dense kernel as a constant
        # (a TorchScript file the size of the dense model); the graph computes from the factors
        inference = not (self.training or torch.is_grad_enabled() or plain_ops_only())
        if inference and x.device.type == "cpu" and x.dim() in (3, 4) and x.shape[-3] == self.in_channels:
            key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
            choice = self._eval_choice.get(key) if self.evaluation == "auto" else self.evaluation == "dense"
            if choice is None:
                choice = self._eval_choice[key] = dense_wins(lambda: self._dense_forward(x),
                                                             lambda: self._factorized_forward(x))
            if choice and not keeping_factors():
                return self._dense_forward(x)
        return self._factorized_forward(x)

    def extra_repr(self) -> str:
        return f"in_rank={self.in_rank}, out_rank={self.out_rank}"
