"""``FactorizedMultiheadAttention``: multi-head attention whose projections are child modules.

:class:`torch.nn.MultiheadAttention` keeps its query/key/value projection as one bare parameter
(``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``) and reads
``out_proj.weight`` itself, so none of its projections can be swapped for a factorized layer.
:class:`FactorizedMultiheadAttention` computes the same function (Vaswani et al. 2017, Section 3.2)
with four child modules named ``q``, ``k``, ``v`` and ``out`` that it only *calls*: any of them can
be replaced, by name, by any module mapping ``(..., in_features)`` to ``(..., embed_dim)``, such as
:class:`ttcompress.layers.tt_linear.TTLinear`.

References
----------
.. [1] A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ttcompress.decompose.modes import _check_positive_int

__all__ = ["FactorizedMultiheadAttention", "disable_nested_fast_path", "unsupported_reason"]

_PROJECTIONS = ("q", "k", "v", "out")


def unsupported_reason(mha: nn.Module) -> str | None:
    """Why ``mha`` cannot be replaced exactly by :class:`FactorizedMultiheadAttention`, or None.

    Every option of :class:`torch.nn.MultiheadAttention` is reproduced; what cannot be is anything
    that changes its behaviour from the outside: a subclass (its forward may differ), hooks or
    parametrizations (they would be lost), an ``out_proj`` that is no longer an ``nn.Linear``, or
    non-floating weights.

    Parameters
    ----------
    mha : torch.nn.Module
        The candidate module.

    Returns
    -------
    str or None
        A one-line reason to keep the layer dense, or None when :meth:`FactorizedMultiheadAttention.from_mha`
        reproduces it exactly.
    """
    if type(mha) is not nn.MultiheadAttention:
        return (f"{type(mha).__name__} is not torch.nn.MultiheadAttention itself "
                "(a subclass may change the forward)")
    if mha._forward_hooks or mha._forward_pre_hooks or getattr(mha, "_backward_hooks", None):
        return "hooks are registered on the attention module and would be lost"
    if getattr(mha, "parametrizations", None) is not None:
        return "the attention weights are parametrized (torch.nn.utils.parametrize)"
    if type(mha.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return f"out_proj is a {type(mha.out_proj).__name__}, not an nn.Linear"
    if mha._qkv_same_embed_dim:
        if mha.in_proj_weight is None:
            return "in_proj_weight is missing"
    elif mha.q_proj_weight is None or mha.k_proj_weight is None or mha.v_proj_weight is None:
        return "q_proj_weight, k_proj_weight or v_proj_weight is missing"
    weight = mha.out_proj.weight
    if not weight.is_floating_point():
        return f"weights have the non-floating dtype {weight.dtype}"
    return None


class FactorizedMultiheadAttention(nn.Module):
    """Drop-in replacement for :class:`torch.nn.MultiheadAttention` with swappable projections.

    ``q(query)``, ``k(key)`` and ``v(value)`` are split into ``num_heads`` heads of size
    ``head_dim = embed_dim // num_heads``; each head computes
    ``softmax(q_h k_h^T / sqrt(head_dim) + mask) v_h`` [1]_, and ``out`` maps the concatenated heads
    back to ``embed_dim``. The forward has the signature and return values of
    ``nn.MultiheadAttention.forward`` (``batch_first``, unbatched 2-D inputs, key-padding and
    attention masks, bool or float, ``is_causal``, ``need_weights``, ``average_attn_weights``,
    ``add_bias_kv``, ``add_zero_attn``, attention dropout) and uses
    :func:`torch.nn.functional.scaled_dot_product_attention` whenever the weights are not needed.

    The forward never reads a projection's ``weight``: it only calls the children, so each can be
    replaced by a factorized layer (e.g. plan pattern ``encoder.layers.*.self_attention.q``).

    Parameters
    ----------
    embed_dim : int
        Model dimension; also the output size of every projection.
    num_heads : int
        Number of heads; must divide ``embed_dim``.
    dropout : float, default 0.0
        Dropout probability on the attention weights (training mode only).
    bias : bool, default True
        Biases in the four projections.
    add_bias_kv : bool, default False
        Append a learned key and value (``bias_k``, ``bias_v``) to the key/value sequences.
    add_zero_attn : bool, default False
        Append a zero key and value (after the heads are split).
    kdim, vdim : int, optional
        Feature sizes of ``key`` and ``value`` (default ``embed_dim``).
    batch_first : bool, default False
        Inputs and outputs are ``(batch, seq, feature)`` instead of ``(seq, batch, feature)``.
    device, dtype : optional
        Factory arguments for the parameters.

    Attributes
    ----------
    q, k, v, out : torch.nn.Module
        The projections (``nn.Linear`` when built; replaceable).
    bias_k, bias_v : torch.nn.Parameter or None
        Shape ``(1, 1, embed_dim)`` with ``add_bias_kv``.

    Notes
    -----
    ``in_proj_weight`` and ``in_proj_bias`` are None and ``_qkv_same_embed_dim`` is False, so that
    the fast-path checks of ``nn.TransformerEncoderLayer`` (which read them) choose the regular path,
    which calls this module (so replacing the attention of a layer whose feed-forward part is
    factorized also keeps that layer off its fast path, which reads ``linear1.weight``). ``out_proj``
    is a read-only alias of ``out``. A parent ``nn.TransformerEncoder`` built with
    ``enable_nested_tensor=True`` must have its ``use_nested_tensor`` set to False when its layers
    change (see :func:`disable_nested_fast_path`): its nested fast path reads their weights.

    References
    ----------
    .. [1] A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    """

    in_proj_weight: None = None
    in_proj_bias: None = None
    _qkv_same_embed_dim: bool = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("kdim", kdim),
                            ("vdim", vdim)):
            if value is not None or name in ("embed_dim", "num_heads"):
                _check_positive_int(value, name)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout = float(dropout)
        self.bias = bool(bias)
        self.add_zero_attn = bool(add_zero_attn)
        self.batch_first = bool(batch_first)
        factory = {"device": device, "dtype": dtype}
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)

    # ------------------------------------------------------------------ construction
    @property
    def out_proj(self) -> nn.Module:
        """Read-only alias of :attr:`out`, for code that reads ``nn.MultiheadAttention.out_proj``."""
        return self.out

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> FactorizedMultiheadAttention:
        """The equivalent module, with ``nn.Linear`` projections split from ``mha``'s weights.

        Device, dtype, training mode and each parameter's ``requires_grad`` are kept.

        Raises
        ------
        TypeError
            If ``mha`` is not a ``torch.nn.MultiheadAttention``.
        ValueError
            If :func:`unsupported_reason` gives a reason.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        reason = unsupported_reason(mha)
        if reason is not None:
            raise ValueError(f"mha cannot be replaced exactly: {reason}")
        weight = mha.out_proj.weight
        layer = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                    add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
                    kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                    device=weight.device, dtype=weight.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
            grads = (mha.in_proj_weight.requires_grad,) * 3
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            grads = tuple(w.requires_grad for w in weights)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        with torch.no_grad():
            for child, w, b, grad in zip((layer.q, layer.k, layer.v), weights, biases, grads):
                child.weight.copy_(w)
                child.weight.requires_grad_(grad)
                if b is not None:
                    child.bias.copy_(b)
                    child.bias.requires_grad_(mha.in_proj_bias.requires_grad)
            layer.out.load_state_dict(mha.out_proj.state_dict())
            for p_new, p_old in zip(layer.out.parameters(), mha.out_proj.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            if mha.bias_k is not None:
                layer.bias_k.copy_(mha.bias_k)
                layer.bias_v.copy_(mha.bias_v)
                layer.bias_k.requires_grad_(mha.bias_k.requires_grad)
                layer.bias_v.requires_grad_(mha.bias_v.requires_grad)
        return layer.train(mha.training)

    def to_mha(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (exact inverse of :meth:`from_mha`).

        Each projection must be an ``nn.Linear`` or have a ``to_linear()`` method (as
        :class:`~ttcompress.layers.tt_linear.TTLinear` has), with a bias exactly when ``bias`` is set.

        Raises
        ------
        TypeError
            If a projection cannot be made dense.
        ValueError
            If a projection's shape or bias does not fit.
        """
        linears = {name: self._dense_child(name) for name in _PROJECTIONS}
        weight = linears["out"].weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.bias,
                                    add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                    device=weight.device, dtype=weight.dtype)
        q, k, v = linears["q"], linears["k"], linears["v"]
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            else:
                mha.q_proj_weight.copy_(q.weight)
                mha.k_proj_weight.copy_(k.weight)
                mha.v_proj_weight.copy_(v.weight)
            if self.bias:
                mha.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            mha.out_proj.load_state_dict(linears["out"].state_dict())
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
        return mha.train(self.training)

    def _dense_child(self, name: str) -> nn.Linear:
        child = getattr(self, name)
        linear = child if isinstance(child, nn.Linear) else None
        if linear is None and callable(getattr(child, "to_linear", None)):
            linear = child.to_linear()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"projection {name!r} is a {type(child).__name__}: neither an nn.Linear nor "
                            "a module with to_linear()")
        in_features = {"k": self.kdim, "v": self.vdim}.get(name, self.embed_dim)
        if (linear.out_features, linear.in_features) != (self.embed_dim, in_features):
            raise ValueError(f"projection {name!r} maps {linear.in_features} -> {linear.out_features}, "
                             f"expected {in_features} -> {self.embed_dim}")
        if (linear.bias is not None) != self.bias:
            raise ValueError(f"projection {name!r} {'has no' if self.bias else 'has a'} bias, but bias={self.bias}")
        return linear

    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments: ``cls(**layer.config())`` has the same structure
        (with ``nn.Linear`` projections; a factorized projection is recorded by its own config)."""
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "bias": self.bias,
            "add_bias_kv": self.bias_k is not None,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
        }

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output and (when ``need_weights``) weights, as ``nn.MultiheadAttention``.

        Shapes (``L`` target and ``S`` source length, ``N`` batch, ``E`` = ``embed_dim``):
        ``query`` is ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched;
        ``key``/``value`` likewise with ``S`` and ``kdim``/``vdim``. ``key_padding_mask`` is
        ``(N, S)`` or ``(S,)``; ``attn_mask`` is ``(L, S)`` or ``(N * num_heads, L, S)``. In bool
        masks True means "do not attend"; float masks are added to the scores. ``is_causal`` is a
        hint that ``attn_mask`` (required) is the causal mask.

        Returns
        -------
        attn_output : torch.Tensor
            Same layout as ``query``, last dimension ``E``.
        attn_weights : torch.Tensor or None
            ``(N, L, S)`` averaged over heads (``(N, num_heads, L, S)`` when not
            ``average_attn_weights``; without ``N`` when unbatched), or None unless ``need_weights``.
        """
        batched = self._check_inputs(query, key, value, key_padding_mask)
        query, key, value = (self._to_batch_first(x, batched) for x in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz, tgt_len, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to create this mask.")
        padding = _float_mask(key_padding_mask, query.dtype, name="key_padding_mask")
        if is_causal and padding is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
        else:
            is_causal = False
            attn_mask = self._attn_mask_4d(_float_mask(attn_mask, query.dtype, name="attn_mask"),
                                           bsz, tgt_len, key.shape[1])

        q = self.q(query).view(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        k = self.k(key)
        v = self.v(value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, -1).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, -1).to(v.dtype)], dim=1)
            attn_mask, padding = _pad_last(attn_mask), _pad_last(padding)
        k = k.view(bsz, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(bsz, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            attn_mask, padding = _pad_last(attn_mask), _pad_last(padding)
        src_len = k.shape[2]
        if padding is not None:
            padding = padding.view(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            heads_out, weights = _attention_with_weights(q, k, v, attn_mask, dropout_p=dropout_p,
                                                         average=average_attn_weights, batched=batched)
        else:
            heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                       is_causal=is_causal)
        output = self.out(heads_out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_padding_mask: torch.Tensor | None) -> bool:
        """Validate the input ranks and feature sizes; return whether the inputs are batched."""
        if any(x.is_nested for x in (query, key, value)):
            raise ValueError("nested tensor inputs are not supported; pass padded tensors and a "
                             "key_padding_mask (for nn.TransformerEncoder: set use_nested_tensor=False)")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        for name, x in (("key", key), ("value", value)):
            if x.dim() != query.dim():
                raise ValueError(f"{name} must have the same number of dimensions as query "
                                 f"({query.dim()}), got shape {tuple(x.shape)}")
        for name, x, size in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != size:
                raise ValueError(f"{name}'s last dimension must be {size}, got shape {tuple(x.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same sequence and batch sizes, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if key_padding_mask is not None:
            src_len = key.shape[1 if batched and self.batch_first else 0]
            expected = (key.shape[0 if self.batch_first else 1], src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"key_padding_mask must have shape {expected} (batch, source length), "
                                 f"got {tuple(key_padding_mask.shape)}")
        return batched

    def _to_batch_first(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return x.unsqueeze(0)
        return x if self.batch_first else x.transpose(0, 1)

    def _attn_mask_4d(self, mask: torch.Tensor | None, bsz: int, tgt_len: int, src_len: int
                      ) -> torch.Tensor | None:
        """``(L, S)`` -> ``(1, 1, L, S)``; ``(N * heads, L, S)`` -> ``(N, heads, L, S)``."""
        if mask is None:
            return None
        if mask.dim() == 2:
            if mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            return mask.view(1, 1, tgt_len, src_len)
        if mask.dim() == 3:
            expected = (bsz * self.num_heads, tgt_len, src_len)
            if mask.shape != expected:
                raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, but should be {expected}.")
            return mask.view(bsz, self.num_heads, tgt_len, src_len)
        raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"dropout={self.dropout}, bias={self.bias}, add_bias_kv={self.bias_k is not None}, "
                f"add_zero_attn={self.add_zero_attn}, batch_first={self.batch_first}")


def _attention_with_weights(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, *,
    dropout_p: float, average: bool, batched: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention of ``(N, heads, L, head_dim)`` inputs: (per-head output, weights).

    The weights are returned before dropout, averaged over heads when ``average``, and without
    the batch dimension when not ``batched`` (as ``nn.MultiheadAttention`` returns them).
    """
    scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    heads_out = dropped @ v
    if average:
        weights = weights.mean(dim=1)
    if not batched:
        weights = weights.squeeze(0)
    return heads_out, weights


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype, *, name: str) -> torch.Tensor | None:
    """A bool mask (True = masked) as an additive float mask (``-inf`` where masked); a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


def _pad_last(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Append one unmasked (zero) column for an appended key."""
    return None if mask is None else F.pad(mask, (0, 1))


def disable_nested_fast_path(model: nn.Module) -> list[str]:
    """Turn off the nested-tensor fast path of every ``nn.TransformerEncoder`` whose layers changed.

    ``nn.TransformerEncoder.forward`` (eval mode, a ``src_key_padding_mask``, no grad) converts its
    input to a nested tensor and reads ``self_attn.in_proj_weight``, ``self_attn.out_proj.weight``
    and ``linear1.weight`` / ``linear2.weight`` of its first layer itself; it decided at
    construction, from the layers it was built with, whether to do so. For an encoder whose layers
    hold a :class:`FactorizedMultiheadAttention` or a ``linear1`` / ``linear2`` that is no longer an
    ``nn.Linear``, this sets ``use_nested_tensor`` to False so that it calls its layers instead.
    Outputs at non-padded positions are unchanged; padded positions are computed instead of being
    left at zero.

    (The fast path of each ``nn.TransformerEncoderLayer`` also reads ``linear1.weight``: it is
    skipped once its ``self_attn`` is a :class:`FactorizedMultiheadAttention`, so a layer whose
    feed-forward part is factorized needs its attention replaced too, even at full rank.)

    Parameters
    ----------
    model : torch.nn.Module
        Searched recursively (the model itself included).

    Returns
    -------
    list of str
        Qualified names of the encoders changed (``""`` for ``model`` itself).
    """
    changed = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)
                and any(_changed_encoder_layer(layer) for layer in module.layers)):
            module.use_nested_tensor = False
            changed.append(name)
    return changed


def _changed_encoder_layer(layer: nn.Module) -> bool:
    if isinstance(getattr(layer, "self_attn", None), FactorizedMultiheadAttention):
        return True
    return any(not isinstance(getattr(layer, name, None), nn.Linear) for name in ("linear1", "linear2"))
