"""TT-SVD (ttcompress.decompose.tt) and mode factorization (ttcompress.decompose.modes).

References are float64 dense reconstructions; tolerances are stated per test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ttcompress.decompose.modes import (
    MAX_PAD_FRACTION,
    balanced_modes,
    choose_modes,
    default_num_cores,
    validate_modes,
)
from ttcompress.decompose.tt import (
    TTMatrix,
    tt_param_count,
    tt_ranks,
    tt_svd,
    tt_to_matrix,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def _random(out_f: int, in_f: int, *, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _trained_looking(out_f: int, in_f: int, *, seed: int) -> torch.Tensor:
    """Decaying singular spectrum (s_i ~ 1/i^1.5) plus a smooth, low-rank-ish structure."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))
    k = min(out_f, in_f)
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.5
    grid = torch.linspace(0, 1, out_f, dtype=torch.float64)[:, None] * torch.linspace(0, 1, in_f, dtype=torch.float64)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T + 0.05 * torch.sin(6 * grid)


def _random_tt(out_modes, in_modes, ranks, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cores = [torch.randn(ranks[k], out_modes[k], in_modes[k], ranks[k + 1], generator=g, dtype=torch.float64)
             for k in range(len(out_modes))]
    return tt_to_matrix(cores)


# ---------------------------------------------------------------------------- modes
@pytest.mark.parametrize("size", [1, 5, 10, 97, 131, 784, 1000, 4096, 4099])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_balanced_modes_cover_size_with_little_padding(size: int, d: int) -> None:
    modes = balanced_modes(size, d)
    assert len(modes) == d and all(m >= 1 for m in modes)
    assert size <= math.prod(modes) <= size * (1 + MAX_PAD_FRACTION)
    validate_modes(modes, size, name="modes", d=d)  # automatic modes pass the explicit-mode check


@pytest.mark.parametrize(("size", "d", "expected"), [
    (4096, 4, (8, 8, 8, 8)), (1000, 3, (10, 10, 10)), (1, 3, (1, 1, 1)), (10, 2, (5, 2)),
    (97, 2, (11, 9)),   # 97 is prime: padded to 99
    (131, 2, (12, 11)),  # 131 is prime: padded to 132
])
def test_balanced_modes_known_values(size: int, d: int, expected: tuple[int, ...]) -> None:
    assert balanced_modes(size, d) == expected


def test_default_num_cores_and_choose_modes() -> None:
    assert default_num_cores(4096, 4096) == 4
    assert default_num_cores(784, 300) == 3
    assert default_num_cores(10, 1) == 2
    in_modes, out_modes = choose_modes(4096, 4096)
    assert in_modes == out_modes == (8, 8, 8, 8)
    in_modes, out_modes = choose_modes(131, 97, d=3, ranks=4)
    assert len(in_modes) == len(out_modes) == 3
    assert math.prod(in_modes) >= 131 and math.prod(out_modes) >= 97


@pytest.mark.parametrize(("modes", "size", "match"), [
    ((4, 4, 3), 64, "multiply to 48"),         # product too small
    ((8, 8, 8), 64, r"\[64, 80\]"),            # far too large to be padding
    ((4, 0, 4), 16, "positive"),
    ((4, 4), 16, "d = 3"),                      # wrong number of modes
])
def test_validate_modes_rejects(modes, size, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_modes(modes, size, name="in_modes", d=3 if match == "d = 3" else None)


def test_validate_modes_accepts_exact_and_padded() -> None:
    assert validate_modes([4, 4, 4], 64, name="in_modes") == (4, 4, 4)
    assert validate_modes((10, 10), 97, name="out_modes") == (10, 10)


# ---------------------------------------------------------------------------- TT-SVD
@pytest.mark.parametrize(("shape", "modes"), [
    ((64, 48), ((4, 4, 4), (4, 4, 3))),     # (out_modes, in_modes)
    ((97, 131), None),                      # padded both sides
    ((1000, 10), None),
    ((5, 1), None),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_is_exact(shape, modes, dtype) -> None:
    w = _random(*shape, seed=1, dtype=dtype)
    kwargs = {} if modes is None else {"out_modes": modes[0], "in_modes": modes[1]}
    tt = tt_svd(w, ranks=10**9, **kwargs)
    assert isinstance(tt, TTMatrix) and tt.shape == shape
    assert all(c.dtype == dtype for c in tt.cores)
    assert tt.ranks == tt_ranks(tt.in_modes, tt.out_modes, 10**9)  # capped at the unfolding maxima
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel(tt.to_dense(), w) <= tol
    assert tt.rel_error <= 1e-12


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3, 0.6])
def test_error_within_eps(kind: str, eps: float) -> None:
    w = _random(96, 120, seed=2) if kind == "random" else _trained_looking(96, 120, seed=3)
    tt = tt_svd(w, eps=eps, d=3)
    actual = _rel(tt.to_dense(), w)
    assert actual <= eps + 1e-12
    assert tt.rel_error == pytest.approx(actual, rel=1e-9, abs=1e-12)


def test_eps_and_ranks_together_take_the_smaller_rank() -> None:
    w = _trained_looking(64, 64, seed=4)
    by_eps = tt_svd(w, eps=0.01, in_modes=(8, 8), out_modes=(8, 8))
    both = tt_svd(w, eps=0.01, ranks=3, in_modes=(8, 8), out_modes=(8, 8))
    assert by_eps.ranks[1] > 3 and both.ranks == (1, 3, 1)
    assert tt_svd(w, eps=0.5, ranks=50, in_modes=(8, 8), out_modes=(8, 8)).ranks[1] < 50


@pytest.mark.parametrize("kind", ["random", "trained"])
def test_error_does_not_increase_with_rank(kind: str) -> None:
    w = _random(64, 64, seed=5) if kind == "random" else _trained_looking(64, 64, seed=6)
    errors = [tt_svd(w, ranks=r, in_modes=(4, 4, 4), out_modes=(4, 4, 4)).rel_error for r in range(1, 20, 2)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors))
    assert errors[0] > errors[-1]


def test_known_tt_rank_is_recovered() -> None:
    out_modes, in_modes, ranks = (4, 3, 5), (2, 4, 3), (1, 3, 2, 1)
    w = _random_tt(out_modes, in_modes, ranks, seed=7)
    at_rank = tt_svd(w, ranks=ranks, out_modes=out_modes, in_modes=in_modes)
    assert at_rank.ranks == ranks and at_rank.rel_error < 1e-12
    assert _rel(at_rank.to_dense(), w) < 1e-12
    found = tt_svd(w, eps=1e-8, out_modes=out_modes, in_modes=in_modes)  # ranks found, not given
    assert found.ranks == ranks
    assert tt_svd(w, ranks=(1, 2, 2, 1), out_modes=out_modes, in_modes=in_modes).rel_error > 1e-3


def test_computes_in_float64_and_casts_back() -> None:
    w = _random(32, 32, seed=8, dtype=torch.bfloat16)
    tt = tt_svd(w, ranks=100, d=2)
    assert all(c.dtype == torch.bfloat16 for c in tt.cores)
    assert tt.rel_error < 1e-12  # measured in float64, before the cast


def test_zero_matrix() -> None:
    tt = tt_svd(torch.zeros(16, 16), eps=0.1, d=2)
    assert tt.rel_error == 0.0 and tt.ranks == (1, 1, 1)


# ---------------------------------------------------------------------------- parameter count
@pytest.mark.parametrize(("in_modes", "out_modes", "ranks"), [
    ((4, 4, 4, 4), (4, 4, 4, 4), 8), ((4, 4, 4), (4, 4, 3), (1, 5, 7, 1)),
    ((2, 2), (3, 1), 100), ((12, 11), (11, 9), 1),
])
def test_param_count_matches_formula_and_decomposition(in_modes, out_modes, ranks) -> None:
    r = tt_ranks(in_modes, out_modes, ranks)
    formula = sum(r[k] * out_modes[k] * in_modes[k] * r[k + 1] for k in range(len(in_modes)))
    assert tt_param_count(in_modes, out_modes, ranks) == formula
    w = _random(math.prod(out_modes), math.prod(in_modes), seed=9, dtype=torch.float32)
    tt = tt_svd(w, ranks=ranks, in_modes=in_modes, out_modes=out_modes)
    assert tt.ranks == r
    assert sum(c.numel() for c in tt.cores) == formula


def test_param_count_known_value_and_caps() -> None:
    assert tt_param_count((8, 8, 8, 8), (8, 8, 8, 8), 8) == 64 * 8 * 2 + 64 * 64 * 2
    assert tt_ranks((2, 2, 2), (2, 2, 2), 100) == (1, 4, 4, 1)  # min(r_{k-1} m n, rest)


# ---------------------------------------------------------------------------- peer reference
@pytest.mark.parametrize(("out_modes", "in_modes", "ranks"), [
    ((4, 4, 4), (4, 4, 4), (1, 3, 5, 1)), ((8, 8), (6, 4), (1, 7, 1)), ((3, 4, 2, 2), (2, 3, 4, 2), (1, 4, 6, 3, 1)),
])
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_matches_tensorly_tensor_train_matrix(out_modes, in_modes, ranks, kind) -> None:
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    m, n = math.prod(out_modes), math.prod(in_modes)
    w = _random(m, n, seed=10) if kind == "random" else _trained_looking(m, n, seed=11)
    ours = tt_svd(w, ranks=ranks, out_modes=out_modes, in_modes=in_modes)
    with tensorly.backend_context("pytorch"):
        peer = tensor_train_matrix(w.reshape(*out_modes, *in_modes), list(ranks))
        peer_w = tt_matrix_to_tensor(peer).reshape(m, n)
    assert ours.ranks == tuple(f.shape[0] for f in peer.factors) + (1,)
    assert ours.rel_error == pytest.approx(_rel(peer_w, w), abs=1e-6)
    assert _rel(ours.to_dense(), w) == pytest.approx(_rel(peer_w, w), abs=1e-6)


# ---------------------------------------------------------------------------- fast routes
def _with_unfolding_spectrum(modes: tuple[int, int], kind: str, *, seed: int) -> torch.Tensor:
    """A matrix whose (interleaved) TT unfolding has a flat or decaying singular spectrum."""
    m1, m2 = modes
    n = m1 * m2
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":
        unfolding = torch.randn(n, n, generator=g, dtype=torch.float64)
    else:
        u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
        i = torch.arange(1, n + 1, dtype=torch.float64)
        s = {"power": i**-0.5, "exp": torch.exp(-i / 20), "cliff": torch.where(i <= 40, 1.0, 0.1)}[kind]
        unfolding = (u * s) @ v.T
    # unfolding[(i1 j1), (i2 j2)] -> W[(i1 i2), (j1 j2)]
    return unfolding.reshape(m1, m1, m2, m2).permute(0, 2, 1, 3).reshape(n, n)


@pytest.mark.parametrize(("kind", "rank"), [("flat", 64), ("power", 64), ("exp", 16), ("cliff", 64)])
def test_randomized_route_within_2_percent_of_exact_tensorly(kind: str, rank: int) -> None:
    """A rank cap on a 1024 x 1024 unfolding takes the range finder; error <= 1.02 x exact TT-SVD."""
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    from ttcompress.decompose.tt import _use_randomized

    modes = (32, 32)
    assert _use_randomized(1024, 1024, rank)
    w = _with_unfolding_spectrum(modes, kind, seed=20)
    ours = tt_svd(w, ranks=rank, out_modes=modes, in_modes=modes)
    with tensorly.backend_context("pytorch"):
        peer = tensor_train_matrix(w.reshape(*modes, *modes), [1, rank, 1])
        exact = _rel(tt_matrix_to_tensor(peer).reshape(w.shape), w)
    assert ours.ranks == (1, rank, 1)
    assert ours.rel_error == pytest.approx(_rel(ours.to_dense(), w), rel=1e-9)
    assert exact <= ours.rel_error <= 1.02 * exact


def test_route_rule() -> None:
    from ttcompress.decompose.tt import _use_randomized

    assert not _use_randomized(64, 262144, 16)  # thin: the 64 x 64 Gram is cheaper
    assert _use_randomized(4096, 4096, 64)
    assert not _use_randomized(4096, 4096, 4090)  # cap near full rank: exact route
    assert not _use_randomized(256, 256, 8)  # small: exact route


@pytest.mark.parametrize("eps", [0.3, 1e-3, 1e-9])
def test_eps_route_keeps_exact_ranks_of_reference_svd(eps: float) -> None:
    """With eps the ranks are those of the exact (float64 full SVD) spectrum, down to eps=1e-9."""
    modes = (8, 8)
    w = _with_unfolding_spectrum(modes, "exp", seed=21)
    unfolding = w.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
    s = torch.linalg.svdvals(unfolding)
    tail = torch.cat([s.flip(0).square().cumsum(0).flip(0), s.new_zeros(1)]).sqrt()
    expected = int(torch.nonzero(tail <= eps * float(w.norm()))[0, 0])
    tt = tt_svd(w, eps=eps, out_modes=modes, in_modes=modes)
    assert tt.ranks == (1, expected, 1)
    assert tt.rel_error == pytest.approx(_rel(tt.to_dense(), w), rel=1e-6, abs=1e-14)
    assert tt.rel_error <= eps


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("weight", "kwargs", "exc", "match"), [
    (torch.randn(4, 4, 4), {"ranks": 2}, ValueError, "weight"),
    (torch.randn(8), {"ranks": 2}, ValueError, "weight"),
    (torch.ones(4, 4, dtype=torch.int64), {"ranks": 2}, TypeError, "weight"),
    (torch.randn(16, 16), {}, ValueError, "ranks.*eps"),
    (torch.randn(16, 16), {"eps": 0.0}, ValueError, r"eps.*\(0, 1\)"),
    (torch.randn(16, 16), {"eps": 1.0}, ValueError, "eps"),
    (torch.randn(16, 16), {"eps": -0.1}, ValueError, "eps"),
    (torch.randn(16, 16), {"ranks": 0}, ValueError, "ranks.*positive"),
    (torch.randn(16, 16), {"ranks": -3}, ValueError, "ranks"),
    (torch.randn(16, 16), {"ranks": (1, 0, 1), "d": 2}, ValueError, "ranks"),
    (torch.randn(16, 16), {"ranks": (2, 4, 1), "d": 2}, ValueError, "start and end with 1"),
    (torch.randn(16, 16), {"ranks": (1, 4, 4, 1), "d": 2}, ValueError, "d \\+ 1"),
    (torch.randn(16, 16), {"ranks": 2, "in_modes": (4, 3)}, ValueError, "in_modes"),
    (torch.randn(16, 16), {"ranks": 2, "out_modes": (4, 4, 1), "in_modes": (4, 4)}, ValueError, "modes"),
    (torch.randn(16, 16), {"ranks": 2, "d": 0}, ValueError, "d"),
    (torch.full((4, 4), float("nan")), {"ranks": 2}, ValueError, "NaN"),
])
def test_bad_input_raises(weight, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        tt_svd(weight, **kwargs)
