"""Bounded-memory paths of calibration (issue 25): the CLI's in-place gather of ``tensors:`` data,
the NaN check by blocks, and the fits' row blocks sized by fan-in. Each must give what the copying /
one-block path gave."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from ttcompress.calibration import data as calib_data
from ttcompress.calibration import fit
from ttcompress.calibration.data import calib_batches, gather_in_place
from ttcompress.calibration.fit import lowrank_output_errors, whitened_lowrank
from ttcompress.calibration.stats import layer_stats
from ttcompress.decompose import tt
from ttcompress.decompose.tt import tt_to_matrix
from ttcompress.errors import DataError


def _nested(x: torch.Tensor, y: torch.Tensor | None = None) -> Subset:
    """A seeded split of a TensorDataset, then a sorted sample of it (what ``decompose --data`` draws)."""
    full = TensorDataset(x) if y is None else TensorDataset(x, y)
    split = Subset(full, [0, 2, 3, 5, 6, 7, 9, 11, 12, 13, 14, 17, 18])
    return Subset(split, [1, 2, 4, 7, 8, 12])


def test_gather_in_place_gives_the_subsets_batches_without_a_copy():
    x = torch.randn(20, 3, 5)
    sample = _nested(x.clone(), torch.arange(20))
    want = [b.clone() for b in calib_batches(sample)]
    rows = gather_in_place(sample)
    assert rows is not None and rows.data_ptr() == sample.dataset.dataset.tensors[0].data_ptr()
    got = list(calib_batches(rows))
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(g.data_ptr() >= rows.data_ptr() and g._base is not None for g in got)  # views, not copies


def test_gather_in_place_leaves_other_data_alone():
    x = torch.randn(10, 4)
    unsorted = Subset(TensorDataset(x), [3, 1, 5])
    assert gather_in_place(unsorted) is None and torch.equal(unsorted.dataset.tensors[0], x)

    class Other(TensorDataset):
        pass

    assert gather_in_place(Subset(Other(x.clone()), [1, 2])) is None


def test_gather_in_place_names_a_bad_sample_by_its_index_in_the_dataset():
    x = torch.randn(20, 3, 5)
    x[6, 1, 2] = float("nan")  # position 4 of the split, 2 of the sample
    with pytest.raises(DataError, match=r"sample 2 \(sample 6 of the dataset it was drawn from\)"):
        gather_in_place(_nested(x))


def test_finite_check_by_blocks_finds_the_first_bad_sample(monkeypatch):
    monkeypatch.setattr(calib_data, "_FINITE_BLOCK", 7)  # blocks of one sample of 12 values
    x = torch.randn(9, 3, 4)
    x[5, 2, 1], x[7, 0, 0] = float("inf"), float("nan")
    with pytest.raises(DataError, match="calib_data sample 5 has"):
        list(calib_batches(x))
    list(calib_batches(x[:5]))


@pytest.mark.parametrize("sketch", [None, 48], ids=["exact", "sketched"])
def test_row_blocks_sized_by_fan_in_give_the_one_block_result(monkeypatch, sketch):
    gen = torch.Generator().manual_seed(0)
    k, out = 96, 70
    x = torch.randn(400, k, generator=gen) @ torch.randn(k, k, generator=gen) / k ** 0.5 + 0.1
    lin = nn.Linear(k, out)
    stats = layer_stats(lin, x + 0.01 * torch.randn(x.shape, generator=gen), dense_inputs=x, sketch_rows=sketch)
    stats = stats.centered()
    cands = [(torch.randn(out, r, generator=gen), torch.randn(r, k, generator=gen), None) for r in (3, 8)]

    def run() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        a, b = whitened_lowrank(lin.weight.detach(), stats, 10)
        return a, b, lowrank_output_errors(lin.weight.detach(), cands, stats, bias=lin.bias.detach())

    one = run()
    monkeypatch.setattr(fit, "_BLOCK_VALUES", 3 * k)  # 3 rows per block, the last one short
    assert fit._row_block(k) == 3
    blocks = run()
    torch.testing.assert_close(blocks[0] @ blocks[1], one[0] @ one[1], rtol=1e-5, atol=1e-6)
    assert blocks[2] == pytest.approx(one[2], rel=1e-9)


def test_tt_to_matrix_by_blocks_equals_one_block(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(1, 4, 3, 5, generator=gen, dtype=torch.float64),
             torch.randn(5, 2, 5, 3, generator=gen, dtype=torch.float64),
             torch.randn(3, 3, 2, 1, generator=gen, dtype=torch.float64)]
    one = tt_to_matrix(cores)
    want = torch.einsum("amnb,bpqc,crsd->mprnqs", *cores).reshape(24, 30)
    torch.testing.assert_close(one, want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(tt, "_MERGE_VALUES", 40)  # a block of one or a few rows of M at each merge
    torch.testing.assert_close(tt_to_matrix(cores), one, rtol=1e-12, atol=1e-12)
    grads = [c.clone().requires_grad_() for c in cores]
    tt_to_matrix(grads).square().sum().backward()  # differentiated: one block, autograd's graph
    assert all(g.grad is not None for g in grads)


@pytest.mark.parametrize("modes", [((3, 4, 5), (2, 3, 2), (1, 3, 4, 1)), ((5, 2, 3, 4), (2, 2, 3, 2), (1, 2, 5, 3, 1))])
def test_tt_normal_equations_through_sketch_rows_equal_the_k_by_k_metric(modes):
    """The TT solve on sketched statistics contracts the rows ``R`` (no ``K x K`` metric): the same
    ``H`` and right-hand sides as ``R^T R + shift I`` formed, on every core (both contraction orders)."""
    ins, outs, ranks = modes
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(ranks[i], outs[i], ins[i], ranks[i + 1], generator=gen, dtype=torch.float64)
             for i in range(len(ins))]
    k, m = int(torch.tensor(ins).prod()), int(torch.tensor(outs).prod())
    rows = torch.randn(6, k, generator=gen, dtype=torch.float64)
    metric = rows.T @ rows + 0.37 * torch.eye(k, dtype=torch.float64)
    d = torch.randn(m, k, generator=gen, dtype=torch.float64)
    for core in range(len(ins)):
        h_ref, rhs_ref = fit._normal_equations(cores, core, metric, d)
        h, rhs = fit._normal_equations(cores, core, fit._RowsMetric(rows, 0.37), d)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12 * float(h_ref.abs().max()))
        torch.testing.assert_close(rhs, rhs_ref, rtol=1e-12, atol=1e-12 * float(rhs_ref.abs().max()))


def test_sketched_tt_fit_by_rows_blocks_equals_one_block(monkeypatch):
    """Blocks of sketch rows (the bound on the temporaries) do not change the fitted cores."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 20)
    x = torch.randn(600, 48) @ torch.randn(48, 48)
    st = layer_stats(layer, x, sketch_rows=24)
    assert st.sketched and not st.exact
    res = tt.tt_svd(layer.weight.detach(), ranks=3, in_modes=(4, 3, 4), out_modes=(5, 2, 2))
    one = fit.refine_tt_cores(res.cores, res.in_modes, res.out_modes, layer.weight.detach(), st)
    monkeypatch.setattr(fit, "_ROWS_BLOCK_VALUES", 50)  # one or two sketch rows per block
    blocks = fit.refine_tt_cores(res.cores, res.in_modes, res.out_modes, layer.weight.detach(), st)
    for a, b in zip(one, blocks):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_handed_over_batches_are_released_after_the_last_statistics():
    """``decompose --data tensors:FILE`` hands its batches over: the collector empties that list once
    the last layer's statistics are taken (before its fit), with the same results as a plain list,
    which is never emptied (the Python API does not touch a user's data)."""
    from ttcompress.calibration.collector import StatsCollector
    from ttcompress.calibration.data import HandedOverBatches
    from ttcompress.calibration.fit import fit_layer
    from ttcompress.calibration.sequential import calibrate_sequentially

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    x = torch.randn(40, 12)
    seen: list[int] = []
    freed: list[bool] = []
    data = [x.clone()]  # what the handed-over batches are views of: nothing else holds it
    ref = weakref.ref(data[0])

    def build(collector):
        def run(name, dense, stats):
            seen.append(len(collector.batches))
            freed.append(ref() is None)
            w = dense.weight.detach()
            start = nn.Sequential(nn.Linear(w.shape[1], 3, bias=False), nn.Linear(3, w.shape[0]))
            return fit_layer(dense, start, stats)
        return run

    results = []
    for batches in (list(x.split(16)), HandedOverBatches(data.pop().split(16))):
        seen.clear()
        freed.clear()
        collector = StatsCollector(batches, memory="64M")
        work = copy.deepcopy(model)
        done = calibrate_sequentially(model, work, ["0", "2"], build(collector), None, collector=collector)
        results.append((done, list(seen), len(batches), work))
    (plain, seen_plain, left_plain, work_plain), (handed, seen_handed, left_handed, work_handed) = results
    assert seen_plain == [3, 3] and left_plain == 3  # a plain list: untouched
    assert seen_handed == [3, 0] and left_handed == 0  # released before the last layer's fit
    assert freed == [False, True]  # and the data freed then (no other reference held on the way)
    # the same fits (to rounding: the two runs' thread schedules may sum in another order)
    assert [r.error_after for r in plain.values()] == pytest.approx([r.error_after for r in handed.values()], rel=1e-9)
    torch.testing.assert_close(work_plain(x), work_handed(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="released"):
        collector.layer_stats(model, work_handed, "0")


def test_sketched_errors_take_float32_weights_by_blocks_as_float64(monkeypatch):
    """On sketched statistics the output error, the corrected bias and the TT fit take the weights by
    float64 row blocks instead of float64 copies: the same values as float64 weights (to rounding)."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 24)
    x = torch.randn(500, 40) @ torch.randn(40, 40)
    st = layer_stats(layer, x, sketch_rows=16)
    assert st.sketched and not st.exact
    w = layer.weight.detach()
    w_hat = w + 0.1 * torch.randn_like(w)
    b, b_hat = layer.bias.detach(), torch.zeros(24)
    monkeypatch.setattr(fit, "_BLOCK_VALUES", 5 * 40)  # 5 rows per block, the last one short
    got = fit.output_error(w, w_hat, st, bias=b, new_bias=b_hat)
    want = fit.output_error(w.double(), w_hat.double(), st, bias=b, new_bias=b_hat)
    assert got == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(fit.corrected_bias(w, b, w_hat, st).double(),
                               fit.corrected_bias(w.double(), b, w_hat.double(), st), rtol=1e-6, atol=1e-6)
    res = tt.tt_svd(w, ranks=3, in_modes=(4, 2, 5), out_modes=(2, 3, 4))
    got_cores = fit.refine_tt_cores(res.cores, res.in_modes, res.out_modes, w, st)
    want_cores = fit.refine_tt_cores(res.cores, res.in_modes, res.out_modes, w.double(), st)
    for a, c in zip(got_cores, want_cores):
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-5, atol=1e-6)


def test_finite_parameter_check_by_blocks(monkeypatch):
    """``check_finite_parameters`` checks a weight by blocks of values (bounded temporaries) and still
    finds a NaN or Inf anywhere in it."""
    from ttcompress.compression.surgery_checks import check_finite_parameters
    from ttcompress.errors import UserInputError

    monkeypatch.setattr(calib_data, "_FINITE_BLOCK", 7)
    layer = nn.Linear(6, 5)
    check_finite_parameters(layer)
    assert calib_data.all_finite(torch.randn(3, 7)) and not calib_data.all_finite(torch.tensor([1.0, float("inf")]))
    with torch.no_grad():
        layer.weight[4, 5] = float("nan")  # the last value, in the last (short) block
    with pytest.raises(UserInputError, match="layer '' has NaN or Inf weight values|NaN or Inf"):
        check_finite_parameters(layer)
