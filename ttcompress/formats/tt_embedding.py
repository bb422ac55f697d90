"""The ``tt_embedding`` format: ``nn.Embedding`` -> :class:`~ttcompress.layers.tt_embedding.TTEmbedding` by TT-SVD.

The table ``W`` (``num_embeddings x embedding_dim``) is factorized like a Linear weight whose
output side is the vocabulary: a plan rule's ``out_modes`` are the vocabulary modes and its
``in_modes`` the embedding-dimension modes. Embeddings with options that have no TT counterpart
(``max_norm``, ``sparse``, ``scale_grad_by_freq``, a non-zero padding row) stay dense with the
reason (:func:`ttcompress.layers.tt_embedding.unsupported_reason`).

References
----------
O. Hrinchuk, V. Khrulkov, L. Mirvakhabova, E. Orlova, I. Oseledets, "Tensorized Embedding Layers",
Findings of EMNLP 2020.
I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ttcompress.decompose.modes import choose_modes, max_num_cores, validate_modes
from ttcompress.errors import InputError
from ttcompress.formats.base import BuildResult, CompressionFormat, FormatDescription, LayerDecision, join, setting
from ttcompress.formats.checks import check_d, check_eps, check_modes, check_ranks
from ttcompress.formats.registry import register_format
from ttcompress.formats.tt import DEFAULT_TT_RANKS, require_modes, tt_params
from ttcompress.layers.tt_embedding import TTEmbedding, unsupported_reason

__all__ = ["TTEmbeddingFormat", "TTEmbeddingSettings"]


@dataclass(frozen=True)
class TTEmbeddingSettings:
    """How ``nn.Embedding`` layers become :class:`~ttcompress.layers.tt_embedding.TTEmbedding`.

    Parameters
    ----------
    ranks : int or tuple of int, optional
        Max TT rank (int) or the full rank tuple ``(1, r1, ..., 1)``. Default 8 when neither
        ``ranks`` nor ``eps`` is given.
    eps : float, optional
        Relative Frobenius error of the table, in (0, 1). With ``ranks`` too, both apply.
    d : int, optional
        Number of TT cores (2 to 64, at most what the table holds: a table too small stays
        dense); chosen by size when None.
    vocab_modes, dim_modes : tuple of int, optional
        Explicit factorizations of ``num_embeddings`` and ``embedding_dim``.
    """

    ranks: int | tuple[int, ...] | None = setting(
        group="size", metavar="INT|none", help="Max TT rank of Embedding tables (default 8).")
    eps: float | None = setting(
        group="size", kind="float", metavar="FLOAT|none", help="Relative error per Embedding table, in (0, 1).")
    d: int | None = setting(metavar="INT|none", help="Number of TT cores of Embedding tables (2 to 64).")
    vocab_modes: tuple[int, ...] | None = setting()
    dim_modes: tuple[int, ...] | None = setting()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", check_ranks(self.ranks, "tt_embedding.ranks"))
        object.__setattr__(self, "eps", check_eps(self.eps, "tt_embedding.eps"))
        object.__setattr__(self, "d", check_d(self.d, "tt_embedding.d"))
        object.__setattr__(self, "vocab_modes", check_modes(self.vocab_modes, "tt_embedding.vocab_modes"))
        object.__setattr__(self, "dim_modes", check_modes(self.dim_modes, "tt_embedding.dim_modes"))


@register_format
class TTEmbeddingFormat(CompressionFormat):
    """TT-matrix embedding tables (TT-SVD of the reshaped table; row lookup without the table)."""

    name = "tt_embedding"
    targets = (nn.Embedding,)
    layer_class = TTEmbedding
    settings = TTEmbeddingSettings
    default_for = (nn.Embedding,)
    summary = "Embedding -> TT-matrix table (TT-SVD; Hrinchuk et al. 2020)"
    #: A plan rule's modes: the vocabulary is the output side, the embedding dimension the input side.
    settings_aliases = {"out_modes": "vocab_modes", "in_modes": "dim_modes"}

    def choose(self, module: nn.Module, name: str, settings: Any, *, aliases: tuple[str, ...] = (),
               lowest: bool = False, settings_of: Any = None) -> LayerDecision:
        reason = unsupported_reason(module)
        if reason is not None:
            return self.dense_decision(module, name, reason, aliases)
        s = settings
        ranks, eps, d = s.ranks, s.eps, s.d
        vocab_modes, dim_modes = s.vocab_modes, s.dim_modes
        if ranks is None and eps is None:
            ranks = DEFAULT_TT_RANKS
        if lowest:
            ranks, eps = 1, None
        vocab, dim = module.weight.shape
        if vocab_modes is None or dim_modes is None:
            d_eff = d if d is not None else (len(vocab_modes or dim_modes or ()) or None)
            if d_eff is not None and d_eff > max_num_cores(dim, vocab):
                return self.dense_decision(module, name, f"{vocab}x{dim} table is too small for {d_eff} TT cores "
                                           f"(at most {max_num_cores(dim, vocab)})", aliases)
            sug_dim, sug_vocab = choose_modes(dim, vocab, d=d_eff, ranks=ranks if ranks is not None else DEFAULT_TT_RANKS)
            vocab_modes, dim_modes = vocab_modes or sug_vocab, dim_modes or sug_dim
        try:
            dim_modes = validate_modes(dim_modes, dim, name="dim_modes")
            vocab_modes = validate_modes(vocab_modes, vocab, name="vocab_modes", d=len(dim_modes))
        except (TypeError, ValueError) as exc:
            raise InputError(f"layer {name!r}", f"({vocab} x {dim} embedding): {exc}") from None
        if len(dim_modes) < 2:
            return self.dense_decision(module, name, f"{vocab}x{dim} table cannot be split into TT cores", aliases)
        options: dict[str, Any] = {"ranks": list(ranks) if isinstance(ranks, tuple) else ranks, "eps": eps,
                                   "vocab_modes": list(vocab_modes), "dim_modes": list(dim_modes)}
        after = None if ranks is None else tt_params(dim_modes, vocab_modes, ranks)
        return self.decision(module, name, options, after, aliases, f"TT ranks {ranks}")

    def rebuild(self, config: Mapping[str, Any]) -> nn.Module:
        """As recorded by ``TTEmbedding.config()``, modes included: nothing is chosen from a file's sizes."""
        return super().rebuild(require_modes(config, ("vocab_modes", "dim_modes")))

    def build(self, module: nn.Module, options: Mapping[str, Any], *, calib: Any = None,
              name: str | None = None) -> BuildResult:
        opts = {k: v for k, v in options.items() if v is not None}
        for key in ("ranks", "vocab_modes", "dim_modes"):
            if isinstance(opts.get(key), list):
                opts[key] = tuple(opts[key])
        return BuildResult.of(TTEmbedding.from_embedding(module, **opts))

    def describe(self, layer: nn.Module) -> FormatDescription:
        ranks = tuple(int(r) for r in layer.ranks)
        vocab, dims = tuple(layer.vocab_modes), tuple(layer.dim_modes)
        text = f"{join(vocab)}x{join(dims)} r={join(ranks, ',')}"
        return FormatDescription(self.name, (int(layer.num_embeddings), int(layer.embedding_dim)), ranks,
                                 dims, vocab, text)

    def suggest(self, decision: LayerDecision) -> str:
        return f"TT table {join(decision.options['vocab_modes'])} x {join(decision.options['dim_modes'])}"

    def flops(self, layer: nn.Module) -> int:
        return int(layer.embedding_dim * max(layer.ranks))
