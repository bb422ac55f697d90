"""``TTEmbedding``: an embedding table stored as a TT-matrix (Hrinchuk et al., 2020).

The ``num_embeddings x embedding_dim`` table ``W`` is factorized with the vocabulary as the row
modes ``(v_1, ..., v_d)`` and the embedding dimension as the column modes ``(e_1, ..., e_d)``:

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]

so the row of token ``i`` depends only on the slices ``G_k[:, i_k, :, :]`` selected by the digits of
``i`` in the mixed radix ``(v_1, ..., v_d)``. A lookup gathers those slices and contracts them, never
building ``W``.

References
----------
.. [1] O. Hrinchuk, V. Khrulkov, L. Mirvakhabova, E. Orlova, I. Oseledets, "Tensorized Embedding
       Layers", Findings of EMNLP 2020.
.. [2] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ttcompress.decompose.modes import _capped_ranks, _check_positive_int, _rank_caps, validate_modes
from ttcompress.decompose.tt import resolve_modes, tt_svd, tt_to_matrix
from ttcompress.layers._export import keeping_factors
from ttcompress.layers._weight import DenseWeightAttribute

__all__ = ["TTEmbedding", "tt_rows", "unsupported_reason"]


def unsupported_reason(embedding: nn.Module) -> str | None:
    """Why ``embedding`` cannot be replaced by :class:`TTEmbedding`, or None.

    ``max_norm`` (renormalizes rows of the stored table in place), ``sparse`` gradients and
    ``scale_grad_by_freq`` have no TT counterpart; a subclass may change the forward; and the
    padding row must be zero, since :class:`TTEmbedding` returns zeros for ``padding_idx``.

    Parameters
    ----------
    embedding : torch.nn.Module
        The candidate module.

    Returns
    -------
    str or None
        A one-line reason to keep the layer dense, or None.
    """
    if type(embedding) is not nn.Embedding:
        return (f"{type(embedding).__name__} is not torch.nn.Embedding itself "
                "(a subclass may change the forward)")
    if embedding.max_norm is not None:
        return f"max_norm={embedding.max_norm} renormalizes rows of the dense table"
    if embedding.sparse:
        return "sparse=True (sparse gradients) has no TT counterpart"
    if embedding.scale_grad_by_freq:
        return "scale_grad_by_freq=True has no TT counterpart"
    if not embedding.weight.is_floating_point():
        return f"the table has the non-floating dtype {embedding.weight.dtype}"
    if embedding._forward_hooks or embedding._forward_pre_hooks:
        return "hooks are registered on the embedding and would be lost"
    if embedding.padding_idx is not None and bool(embedding.weight[embedding.padding_idx].any()):
        return f"the row of padding_idx={embedding.padding_idx} is not zero"
    return None


class TTEmbedding(DenseWeightAttribute, nn.Module):
    """Embedding lookup from a TT-matrix table (Hrinchuk et al., 2020).

    Core ``k`` has shape ``(r_{k-1}, v_k, e_k, r_k)`` with ``prod v_k >= num_embeddings`` and
    ``prod e_k >= embedding_dim`` (padded sizes are exact: padded rows are never looked up and
    padded columns are cropped). A lookup (:func:`tt_rows`) never builds the table: the cores are
    split in two (where that needs the fewest multiply-adds), each half is contracted once per distinct
    vocabulary prefix / suffix in the batch, and each distinct index costs one
    ``(N_left x r_s) @ (r_s x N_right)`` product, ``embedding_dim * r_s`` multiply-adds.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
        Table size, as for :class:`torch.nn.Embedding`.
    ranks : int or sequence of int
        TT-rank cap: an int for all internal ranks or a full tuple ``(1, r_1, ..., r_{d-1}, 1)``;
        capped at each unfolding's maximum (a huge value means full rank).
    vocab_modes, dim_modes : sequence of int, optional
        Explicit modes of ``num_embeddings`` and ``embedding_dim`` (default: balanced modes from
        :func:`ttcompress.decompose.modes.choose_modes`). Their products must equal the size or a
        zero-padded size at most 25 % larger.
    d : int, optional
        Number of cores when modes are chosen automatically (default 2-4 by size).
    padding_idx : int, optional
        Its output row is zero and gets no gradient, as in :class:`torch.nn.Embedding`. Negative
        values count from the end.
    device, dtype : optional
        Factory arguments for the cores.

    Attributes
    ----------
    cores : torch.nn.ParameterList
        Core ``k`` of shape ``(ranks[k], vocab_modes[k], dim_modes[k], ranks[k + 1])``.
    ranks : tuple of int
        ``(1, r_1, ..., r_{d-1}, 1)`` after capping.
    rel_error : float or None
        Relative Frobenius error of the TT-SVD when built by :meth:`from_embedding`, else None.

    References
    ----------
    .. [1] O. Hrinchuk et al., "Tensorized Embedding Layers", Findings of EMNLP 2020.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        ranks: int | Sequence[int],
        vocab_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        d: int | None = None,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int(num_embeddings, "num_embeddings")
        _check_positive_int(embedding_dim, "embedding_dim")
        if ranks is None:
            raise ValueError("ranks must be given: a positive int or a tuple (1, r_1, ..., r_{d-1}, 1)")
        if vocab_modes is not None:
            vocab_modes = validate_modes(vocab_modes, num_embeddings, name="vocab_modes", d=d)
        if dim_modes is not None:
            dim_modes = validate_modes(dim_modes, embedding_dim, name="dim_modes", d=d)
        if vocab_modes is not None and dim_modes is not None and len(vocab_modes) != len(dim_modes):
            raise ValueError(f"vocab_modes and dim_modes must have the same length, got {vocab_modes!r} "
                             f"and {dim_modes!r}")
        dims, vocab, caps = resolve_modes(embedding_dim, num_embeddings, ranks=ranks, in_modes=dim_modes,
                                          out_modes=vocab_modes, d=d)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _check_padding_idx(padding_idx, num_embeddings)
        self.vocab_modes: tuple[int, ...] = vocab
        self.dim_modes: tuple[int, ...] = dims
        self.ranks: tuple[int, ...] = _capped_ranks(vocab, dims, _rank_caps(caps, len(dims)))
        self.rel_error: float | None = None
        factory = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], vocab[k], dims[k], self.ranks[k + 1], **factory))
            for k in range(len(dims))
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Random cores whose implied table has ``nn.Embedding``'s default ``N(0, 1)`` variance.

        With i.i.d. zero-mean core entries of variance ``s^2``, ``Var W_ij = s^{2d} prod_k r_k``,
        so each core gets ``s^2 = (1 / prod_k r_k) ** (1 / d)``.
        """
        std = math.sqrt((1.0 / math.prod(self.ranks)) ** (1.0 / len(self.cores)))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, std)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        *,
        ranks: int | Sequence[int] | None = None,
        eps: float | None = None,
        vocab_modes: Sequence[int] | None = None,
        dim_modes: Sequence[int] | None = None,
        d: int | None = None,
    ) -> TTEmbedding:
        """Build a TTEmbedding from a (trained) ``nn.Embedding`` by TT-SVD of its table.

        Parameters
        ----------
        embedding : torch.nn.Embedding
            The layer to compress; its device, dtype, ``padding_idx`` and training mode are kept.
        ranks : int or sequence of int, optional
            Rank cap (int or full tuple); a huge value means full rank.
        eps : float, optional
            Relative Frobenius accuracy in ``(0, 1)``: ``||W - W_hat||_F <= eps ||W||_F``. At least
            one of ``ranks`` / ``eps`` is required; with both, both apply.
        vocab_modes, dim_modes, d : optional
            As in the constructor.

        Raises
        ------
        TypeError
            If ``embedding`` is not an ``nn.Embedding``.
        ValueError
            If :func:`unsupported_reason` gives a reason, or for bad ranks / eps / modes.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        reason = unsupported_reason(embedding)
        if reason is not None:
            raise ValueError(f"embedding cannot be replaced: {reason}")
        if vocab_modes is not None:
            validate_modes(vocab_modes, embedding.num_embeddings, name="vocab_modes", d=d)
        if dim_modes is not None:
            validate_modes(dim_modes, embedding.embedding_dim, name="dim_modes", d=d)
        table = embedding.weight
        result = tt_svd(table, ranks=ranks, eps=eps, in_modes=dim_modes, out_modes=vocab_modes, d=d)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, ranks=result.ranks,
                    vocab_modes=result.out_modes, dim_modes=result.in_modes,
                    padding_idx=embedding.padding_idx, device=table.device, dtype=table.dtype)
        with torch.no_grad():
            for param, core in zip(layer.cores, result.cores):
                param.copy_(core)
                param.requires_grad_(table.requires_grad)
        layer.rel_error = result.rel_error
        return layer.train(embedding.training)

    def to_embedding(self) -> nn.Embedding:
        """The equivalent dense ``nn.Embedding`` (same device, dtype and ``padding_idx``)."""
        first = self.cores[0]
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device=first.device, dtype=first.dtype)
        with torch.no_grad():
            embedding.weight.copy_(self.dense_weight())
        return embedding.train(self.training)

    def dense_weight(self) -> torch.Tensor:
        """The dense ``(num_embeddings, embedding_dim)`` table (differentiable; padding row zero)."""
        table = tt_to_matrix(list(self.cores))[: self.num_embeddings, : self.embedding_dim]
        if self.padding_idx is not None:
            keep = torch.ones(self.num_embeddings, 1, dtype=torch.bool, device=table.device)
            keep[self.padding_idx] = False
            table = table * keep
        return table

    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor kwargs: ``TTEmbedding(**layer.config())`` has the same structure."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "ranks": list(self.ranks),
            "vocab_modes": list(self.vocab_modes),
            "dim_modes": list(self.dim_modes),
            "padding_idx": self.padding_idx,
        }

    # ------------------------------------------------------------------ sizes
    @property
    def dense_params(self) -> int:
        """Parameters of the equivalent ``nn.Embedding``."""
        return self.num_embeddings * self.embedding_dim

    @property
    def compression_ratio(self) -> float:
        """``dense_params / own parameter count``."""
        return self.dense_params / sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the table for ``indices`` of any shape; output shape ``(*indices.shape, embedding_dim)``."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError("indices must be a torch.long or torch.int tensor, got "
                            f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
        flat = indices.reshape(-1).long()
        # (not while tracing or exporting: the check reads the data, which a graph cannot; the graph's
        # own gather then decides what an out-of-range index does, as nn.Embedding's would)
        if (flat.numel() and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
                and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings)):
            raise IndexError(f"indices must be in [0, {self.num_embeddings}), got values in "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        rows = tt_rows(list(self.cores), flat, self.vocab_modes)[:, : self.embedding_dim]
        if self.padding_idx is not None:
            rows = rows.masked_fill((flat == self.padding_idx)[:, None], 0.0)
        return rows.reshape(*indices.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"vocab_modes={self.vocab_modes}, dim_modes={self.dim_modes}, ranks={self.ranks}, "
                f"padding_idx={self.padding_idx}, params={params}, ratio={self.compression_ratio:.1f}x")


def tt_rows(cores: Sequence[torch.Tensor], indices: torch.Tensor, row_modes: Sequence[int]) -> torch.Tensor:
    """Rows ``indices`` of the TT-matrix with the given cores, without building the matrix.

    The digits ``(i_1, ..., i_d)`` of an index in the mixed radix ``row_modes`` select the slices
    ``G_k[:, i_k]`` (shape ``(r_{k-1}, n_k, r_k)``); the row is their contraction. The cores
    are split before a core ``s`` chosen by multiply-add count: the left chain ``G_1[:, i_1] ... G_s[:, i_s]`` is
    contracted once per distinct prefix ``(i_1..i_s)`` present, the right chain once per distinct
    suffix, and each row is one ``(N_left x r_s) @ (r_s x N_right)`` product, ``N_left N_right r_s``
    multiply-adds (``N``: products of the column modes on each side).

    Parameters
    ----------
    cores : sequence of torch.Tensor
        Core ``k`` of shape ``(r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``.
    indices : torch.Tensor
        1-D long tensor of row indices in ``[0, prod m_k)``.
    row_modes : sequence of int
        ``(m_1, ..., m_d)``.

    Returns
    -------
    torch.Tensor
        ``(len(indices), prod n_k)``: row ``b`` is ``W[indices[b], :]``.
    """
    d = len(cores)
    cols = math.prod(core.shape[2] for core in cores)
    if indices.numel() == 0:
        return cores[0].new_zeros(0, cols)
    # Exported (keeping_factors): no deduplication, whose data-dependent count a graph cannot size;
    # every index is contracted, the split chosen for a nominal count.
    dedupe = not keeping_factors()
    unique, inverse = torch.unique(indices, return_inverse=True) if dedupe else (indices, None)
    if d == 1:
        rows = cores[0][0, unique, :, 0]
        return rows[inverse] if dedupe else rows
    count = unique.shape[0]
    nominal = count if dedupe else _NOMINAL_COUNT
    split = min(range(1, d), key=lambda s: _split_cost(cores, row_modes, s, nominal))
    right_size = math.prod(row_modes[split:])
    left = _chain(cores[:split], unique // right_size, row_modes[:split], dedupe)  # (U, 1, N_l, r_s)
    right = _chain(cores[split:], unique % right_size, row_modes[split:], dedupe)  # (U, r_s, N_r, 1)
    rank = cores[split].shape[0]
    rows = torch.bmm(left.reshape(count, -1, rank), right.reshape(count, rank, -1)).reshape(count, cols)
    return rows.index_select(0, inverse) if dedupe else rows


#: Index count the exported graph's split is chosen for (its real count is the input's).
_NOMINAL_COUNT = 1024


def _chain_cost(cores: Sequence[torch.Tensor], count: int) -> int:
    """Multiply-adds of :func:`_chain` over ``count`` distinct indices."""
    r_first, _, cols, _ = cores[0].shape
    macs = 0
    for core in cores[1:]:
        r_left, _, n, r_right = core.shape
        macs += count * r_first * cols * r_left * n * r_right
        cols *= n
    return macs


def _split_cost(cores: Sequence[torch.Tensor], row_modes: Sequence[int], split: int, count: int) -> int:
    """Multiply-adds of :func:`tt_rows` for ``count`` distinct indices when split before core ``split``
    (at most ``prod`` of a side's row modes distinct prefixes / suffixes)."""
    left = _chain_cost(cores[:split], min(count, math.prod(row_modes[:split])))
    right = _chain_cost(cores[split:], min(count, math.prod(row_modes[split:])))
    n_left = math.prod(core.shape[2] for core in cores[:split])
    n_right = math.prod(core.shape[2] for core in cores[split:])
    return left + right + count * n_left * cores[split].shape[0] * n_right


def _chain(cores: Sequence[torch.Tensor], indices: torch.Tensor, row_modes: Sequence[int],
           dedupe: bool = True) -> torch.Tensor:
    """``G_1[:, i_1] ... G_k[:, i_k]`` for each index, as ``(B, r_0, n_1..n_k, r_k)``.

    Computed once per distinct index and gathered (unless not ``dedupe``), so a chain over few row
    modes costs little.
    """
    unique, inverse = torch.unique(indices, return_inverse=True) if dedupe else (indices, None)
    digits = []
    rest = unique
    for m in reversed(row_modes):
        digits.append(rest % m)
        rest = rest // m
    digits.reverse()
    count = unique.shape[0]
    r_first, _, cols, r_next = cores[0].shape
    state = _slices(cores[0], digits[0]).reshape(count, r_first * cols, r_next)
    for core, digit in zip(cores[1:], digits[1:]):
        r_left, _, n, r_right = core.shape
        cols *= n
        state = torch.bmm(state, _slices(core, digit).reshape(count, r_left, n * r_right))
        state = state.reshape(count, r_first * cols, r_right)
    state = state.reshape(count, r_first, cols, -1)
    return state.index_select(0, inverse) if dedupe else state


def _slices(core: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """``core[:, digits]`` as a contiguous ``(len(digits), r * n * r')`` tensor (one gather of rows)."""
    return core.transpose(0, 1).reshape(core.shape[1], -1).index_select(0, digits)


def _check_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings
