"""setperm.pyg: PermutationAggregation equals the dense encoder, is invariant to node order and to
batching, gives zeros for empty graphs, and works as a GNN readout and as a MessagePassing aggr."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("torch_geometric")

from torch_geometric.data import Batch, Data  # noqa: E402
from torch_geometric.nn import GCNConv, SAGEConv  # noqa: E402

from setperm.pyg import PermutationAggregation  # noqa: E402
from setperm import PermutationOptimization, PermutationSetEncoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL64 = dict(rtol=1e-9, atol=1e-10)


def _po(in_channels=5, permutation="po-u", **kw):
    """The aggregation's PO (None for the LSTM-only ablation)."""
    if permutation is None:
        return None
    kw.setdefault("cost_hidden", 8)
    kw.setdefault("steps", 3)
    return PermutationOptimization(in_channels, permutation=permutation, **kw)


def _aggr(in_channels=5, out_channels=7, permutation="po-u", straight_through=False, pool=None, rnn="lstm", **kw):
    torch.manual_seed(0)
    return PermutationAggregation(in_channels, out_channels, _po(in_channels, permutation, **kw),
                                  straight_through=straight_through, pool=pool, rnn=rnn).double()


def _sparse_sets(sizes, features=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), features, generator=g, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return x, index


@pytest.mark.parametrize("pool,rnn", [(None, "lstm"), ("sum", "lstm"), ("mean", "lstm"), (None, "gru")])
def test_equals_dense_encoder_on_the_same_sets(pool, rnn):
    aggr = _aggr(pool=pool, rnn=rnn)
    assert (f"pool={pool!r}" in repr(aggr)) is (pool is not None)
    assert ("rnn='gru'" in repr(aggr)) is (rnn == "gru")
    dense = PermutationSetEncoder(5, 7, _po(), pool=pool, rnn=rnn).double()
    dense.load_state_dict(aggr.encoder.state_dict())
    sizes = [4, 1, 6, 3]
    x, index = _sparse_sets(sizes)
    w = torch.randn(x.shape[0], dtype=torch.float64)
    padded = torch.zeros(len(sizes), max(sizes), 5, dtype=torch.float64)
    padded_w = torch.zeros(len(sizes), max(sizes), dtype=torch.float64)
    mask = torch.arange(max(sizes)) < torch.tensor(sizes)[:, None]
    padded[mask], padded_w[mask] = x, w
    assert_close(aggr(x, index), dense(padded, mask=mask), **TOL64)
    assert_close(aggr(x, index, weights=w), dense(padded, mask=mask, weights=padded_w), **TOL64)
    assert_close(aggr(x, index, weights=w.unsqueeze(1)), dense(padded, mask=mask, weights=padded_w), **TOL64)
    # CSR boundaries give the same as the index vector
    ptr = torch.tensor([0, 4, 5, 11, 14])
    assert_close(aggr(x, ptr=ptr), aggr(x, index), **TOL64)


def test_weights_are_cut_with_their_elements_past_max_num_elements():
    aggr = _aggr()
    sizes, cut = [4, 2, 5], 3
    x, index = _sparse_sets(sizes)
    w = torch.randn(x.shape[0], dtype=torch.float64)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    sets = [aggr.encoder(x[s:s + min(n, cut)][None], weights=w[s:s + min(n, cut)][None])
            for s, n in zip(starts, sizes)]
    assert_close(aggr(x, index, max_num_elements=cut, weights=w), torch.cat(sets), **TOL64)


def test_past_pygs_densification_the_path_cuda_takes_makes_the_host_wait_nowhere(device_path):
    """PyG's ``Aggregation.to_dense_batch`` checks on the host that ``index`` is sorted (as for PyG's own
    aggregations); everything the adapter does around it, weights included, makes the host wait nowhere
    (conftest's ``HostWaits``) and gives the CPU path's values."""
    aggr = _aggr()
    x, index = _sparse_sets([4, 1, 6, 3])
    w = torch.randn(x.shape[0], dtype=torch.float64)
    expected = aggr(x, index, dim_size=4, max_num_elements=6, weights=w)
    with device_path(exempt=[(PermutationAggregation, "to_dense_batch")]) as waits:
        out = aggr(x, index, dim_size=4, max_num_elements=6, weights=w)
        out.sum().backward()
    assert waits.calls == {"to_dense_batch": 1}                            # weights densified in the same call
    assert_close(out, expected, **TOL64)


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("permutation", ["po-u", "po-la"])
def test_output_of_a_graph_is_invariant_to_the_order_of_its_nodes(permutation, straight_through):
    aggr = _aggr(permutation=permutation, num_positions=8 if permutation == "po-la" else None,
                 straight_through=straight_through)
    assert aggr.encoder.straight_through is straight_through
    sizes = [5, 8, 2]
    x, index = _sparse_sets(sizes)
    out = aggr(x, index)
    g = torch.Generator().manual_seed(3)
    perm = torch.cat([start + torch.randperm(n, generator=g)
                      for start, n in zip(torch.tensor([0] + sizes[:-1]).cumsum(0).tolist(), sizes)])
    assert not torch.equal(perm, torch.arange(len(perm)))
    assert_close(aggr(x[perm], index), out, **TOL64)


def test_lstm_only_ablation_does_depend_on_node_order():
    # the invariance test above can fail: the LSTM-only ablation (po=None) reads the given order
    aggr = _aggr(permutation=None)
    x, index = _sparse_sets([6])
    assert not torch.allclose(aggr(x.flip(0), index), aggr(x, index))


def test_invariant_to_how_graphs_are_batched_together():
    aggr = _aggr()
    sizes = [3, 9, 1, 5]
    x, index = _sparse_sets(sizes)
    together = aggr(x, index)
    starts = [0, 3, 12, 13]
    alone = torch.cat([aggr(x[s:s + n], torch.zeros(n, dtype=torch.long)) for s, n in zip(starts, sizes)])
    assert_close(together, alone, **TOL64)
    # a different partner and padding length: the first set with only the last one
    pair = aggr(torch.cat([x[:3], x[13:]]), torch.tensor([0] * 3 + [1] * 5))
    assert_close(pair, together[[0, 3]], **TOL64)
    # padding to a fixed max_num_elements changes nothing
    assert_close(aggr(x, index, dim_size=4, max_num_elements=12), together, **TOL64)


def test_empty_graphs_give_zeros_and_finite_gradients():
    aggr = _aggr()
    x, index = _sparse_sets([4, 2])
    x.requires_grad_(True)
    index = torch.tensor([0, 0, 0, 0, 3, 3])          # sets 1, 2 and 4 have no elements
    out = aggr(x, index, dim_size=5)
    assert out.shape == (5, 7)
    assert_close(out[[1, 2, 4]], torch.zeros(3, 7, dtype=torch.float64), rtol=0, atol=0)
    assert out[[0, 3]].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # no element at all
    empty = aggr(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long), dim_size=3)
    assert_close(empty, torch.zeros(3, 7, dtype=torch.float64), rtol=0, atol=0)


def test_no_set_at_all_gives_an_empty_output_as_pygs_sum_and_mean_do():
    # dim_size 0: a graph without nodes through a MessagePassing layer, or an empty batch (index or ptr)
    aggr = _aggr()
    none = torch.zeros(0, 5, dtype=torch.float64)
    for out in (aggr(none, torch.zeros(0, dtype=torch.long)), aggr(none), aggr(none, ptr=torch.tensor([0])),
                aggr(none, torch.zeros(0, dtype=torch.long), weights=torch.zeros(0, dtype=torch.float64))):
        assert out.shape == (0, 7) and out.dtype == torch.float64
    torch.manual_seed(0)
    conv = SAGEConv(5, 6, aggr=PermutationAggregation(5, 5, _po())).double()
    assert conv(none, torch.zeros(2, 0, dtype=torch.long)).shape == (0, 6)
    with pytest.raises(ValueError, match="dim_size"):        # elements but no set: still refused
        aggr(torch.zeros(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long), dim_size=0)


def _graphs(num, features=4, seed=0):
    """Small random graphs with a label (does the graph hold more nodes with feature 0 > 0 than not)."""
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for _ in range(num):
        n = int(torch.randint(3, 9, (1,), generator=g))
        x = torch.randn(n, features, generator=g)
        src = torch.arange(n)
        edge_index = torch.stack([torch.cat([src, (src + 1) % n]), torch.cat([(src + 1) % n, src])])   # a ring
        y = (x[:, 0] > 0).float().mean().gt(0.5).long().view(1)
        graphs.append(Data(x=x, edge_index=edge_index, y=y))
    return graphs


class _ReadoutGNN(torch.nn.Module):
    def __init__(self, features=4, hidden=16):
        super().__init__()
        self.conv = GCNConv(features, hidden)
        self.readout = PermutationAggregation(hidden, hidden, PermutationOptimization(hidden, cost_hidden=8, steps=2))
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, batch):
        h = self.conv(batch.x, batch.edge_index).relu()
        return self.head(self.readout(h, batch.batch, dim_size=batch.num_graphs))


def test_readout_of_a_small_gnn_on_a_real_batch():
    torch.manual_seed(0)
    model = _ReadoutGNN()
    graphs = _graphs(12)
    batch = Batch.from_data_list(graphs)
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(Batch.from_data_list([d])) for d in graphs])
    assert together.shape == (12, 2)
    assert_close(together, alone, rtol=1e-5, atol=1e-5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch), batch.y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_as_the_aggr_of_a_message_passing_layer_invariant_to_neighbour_order():
    torch.manual_seed(0)
    po = PermutationOptimization(4, cost_hidden=8, steps=2)
    conv = SAGEConv(4, 6, aggr=PermutationAggregation(4, 4, po)).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    # node 5 has no incoming edge: its neighbourhood aggregates to zeros
    dst = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])
    src = torch.tensor([1, 2, 3, 0, 4, 5, 0, 1, 2, 5, 3])
    out = conv(x, torch.stack([src, dst]))
    # shuffle the edges of every destination; edges stay sorted by destination as PyG requires
    order = torch.cat([torch.nonzero(dst == d).flatten()[torch.randperm(int((dst == d).sum()), generator=g)]
                       for d in range(5)])
    assert_close(conv(x, torch.stack([src[order], dst[order]])), out, **TOL64)
    assert_close(conv.aggr_module(x[src], dst, dim_size=6)[5], torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)


def test_reset_parameters_reinitialises_in_place():
    aggr = _aggr()
    params = list(aggr.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    torch.manual_seed(0)
    aggr.reset_parameters()
    assert all(p is q for p, q in zip(aggr.parameters(), params))     # optimisers keep working
    torch.manual_seed(0)
    fresh = PermutationSetEncoder(5, 7, _po(dtype=torch.float64), dtype=torch.float64)
    for p, q in zip(aggr.encoder.parameters(), fresh.parameters()):
        assert_close(p, q, rtol=0, atol=0)
    assert_close(aggr.eta, torch.tensor(1.0, dtype=torch.float64))


def test_argument_checks_and_repr():
    with pytest.raises(ValueError, match="in_channels"):
        PermutationAggregation(0, 4)
    with pytest.raises(ValueError, match="out_channels"):
        PermutationAggregation(4, 2.5)
    with pytest.raises(TypeError):
        PermutationAggregation(4, 4, hidden_size=8)
    with pytest.raises(ValueError, match="po must be"):
        PermutationAggregation(4, 4, "sorted")
    with pytest.raises(ValueError, match="po orders 5 features"):
        PermutationAggregation(4, 4, PermutationOptimization(5))
    with pytest.raises(TypeError):
        PermutationAggregation(4, 4, "po-u", True)               # keyword-only after po
    aggr = PermutationAggregation(4, 6, PermutationOptimization(4, cost_hidden=8, steps=2))
    with pytest.raises(ValueError, match=r"x must have shape \(E, 4\), got \(3, 5\)"):
        aggr(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        aggr(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), weights=torch.randn(2))
    with pytest.raises(ValueError, match="not sorted"):
        aggr(torch.randn(3, 4), torch.tensor([1, 0, 1]))
    text = repr(aggr)
    assert text.startswith("PermutationAggregation(4, 6,") and "steps=2" in text and "po-u" in text


def test_max_num_elements_is_checked():
    # 0 would drop every element and give zeros for every set; PO-LA has one position per slot of the
    # dense batch, so padding past num_positions is refused by name, not as a set "of N elements"
    aggr = _aggr()
    x, index = _sparse_sets([2, 3])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_num_elements must be a positive int, got {bad!r}"):
            aggr(x, index, max_num_elements=bad)
    la = _aggr(permutation="po-la", num_positions=3)
    assert_close(la(x, index, max_num_elements=3), la(x, index), **TOL64)
    with pytest.raises(ValueError, match=r"max_num_elements=4 pads every set to 4 elements, more than the 3 "
                                         r"positions of PO-LA"):
        la(x, index, max_num_elements=4)


def test_index_and_ptr_must_cover_the_rows_of_x():
    aggr = _aggr()
    x, index = _sparse_sets([2, 3])
    for bad in (index[:3], torch.cat([index, index])):
        with pytest.raises(ValueError, match=rf"index must have shape \(5,\), .* got \({bad.shape[0]},\)"):
            aggr(x, bad)
    for bad in ([0, 2, 4], [0, 2, 7]):
        with pytest.raises(ValueError, match=rf"ptr must mark the boundaries of the 5 rows of x, got boundaries "
                                             rf"spanning {bad[-1]} rows"):
            aggr(x, ptr=torch.tensor(bad))
    assert_close(aggr(x, ptr=torch.tensor([0, 2, 5])), aggr(x, index), **TOL64)


def test_ptr_must_be_integer_boundaries_from_the_first_row_to_the_last():
    # as PyG's segment reads them: set s is rows ptr[s]:ptr[s + 1]; a ptr that does not start at 0 but spans
    # as many rows as x has was read as other sets, without a word
    aggr = _aggr()
    x, index = _sparse_sets([2, 3])
    with pytest.raises(ValueError, match=r"ptr must start at 0, the first row of x, got ptr\[0\] = 1"):
        aggr(x, ptr=torch.tensor([1, 3, 6]))
    with pytest.raises(ValueError, match=r"ptr must be non-decreasing, got ptr\[1\] = 4 > ptr\[2\] = 2"):
        aggr(x, ptr=torch.tensor([0, 4, 2, 5]))
    for bad, got in ((torch.tensor([0.0, 2.0, 5.0]), "torch.float32 of shape (3,)"),
                     (torch.tensor([[0, 2, 5]]), "torch.int64 of shape (1, 3)")):
        with pytest.raises(ValueError, match=re.escape(f"ptr must be a 1-D integer tensor of S + 1 CSR boundaries, "
                                                       f"got {got}")):
            aggr(x, ptr=bad)
    assert_close(aggr(x, ptr=torch.tensor([0, 2, 2, 5]), dim_size=3)[[0, 2]], aggr(x, index), **TOL64)
    assert aggr(x[:0], ptr=torch.tensor([0, 0])).shape == (1, 7)


def test_po_la_names_the_largest_set_and_max_num_elements_when_a_set_outgrows_its_positions():
    # the encoder's own message names the dense batch, a shape the PyG caller never made
    la = _aggr(permutation="po-la", num_positions=3)
    x, index = _sparse_sets([2, 5, 1])
    with pytest.raises(ValueError, match=r"the largest set has 5 elements, more than the 3 positions of "
                                         r"PermutationOptimization \(num_positions\); pass max_num_elements=3"):
        la(x, index)
    assert la(x, index, max_num_elements=3).shape == (3, 7)


def test_a_non_finite_element_is_named_by_its_row_of_x_and_its_set():
    # the encoder's own check names an index of the dense batch, which the PyG caller never made
    aggr = _aggr()
    x, index = _sparse_sets([2, 3, 4])
    x[6, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x has a non-finite value in row 6 \(set 2\)"):
        aggr(x, index)
    w = torch.zeros(x.shape[0], dtype=torch.float64)
    w[3] = float("inf")
    with pytest.raises(ValueError, match=r"weights has a non-finite value in row 3 \(set 1\)"):
        aggr(x[:5], index[:5], weights=w[:5])
    assert aggr(x, index, max_num_elements=1).isfinite().all()          # the row is dropped: nothing to check


def test_finite_input_is_checked_once_per_call(monkeypatch):
    # the encoder's check; the aggregation repeats it only to name the row of a failure
    import setperm.masking as masking

    calls = []
    real = masking.first_non_finite
    monkeypatch.setattr(masking, "first_non_finite", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr("setperm.pyg.first_non_finite", masking.first_non_finite)
    aggr = PermutationAggregation(5, 7).double()        # (its "po-u" module leaves the check to the encoder)
    x, index = _sparse_sets([2, 3, 4])
    aggr(x, index)
    assert len(calls) == 1
    aggr(x, index, weights=torch.zeros(x.shape[0], dtype=x.dtype))
    assert len(calls) == 3                                           # x and the weights


def test_core_library_does_not_import_pyg():
    code = "import sys, setperm; assert 'torch_geometric' not in sys.modules, 'setperm imported torch_geometric'"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


def test_documented_examples_run_as_written(capsys):
    """The code blocks of docs/pyg.md (after the call signature) run in order and print what their
    comments say."""
    doc = (REPO / "docs" / "pyg.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)[1:]
    assert len(blocks) == 2
    torch.manual_seed(0)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/pyg.md", "exec"), scope)
    out = capsys.readouterr().out.split("\n")
    assert out[:2] == ["torch.Size([3, 4])", "torch.Size([5, 32])"], out


def test_on_every_device_equals_the_cpu_and_is_invariant_to_node_order(device):
    aggr = _aggr()
    sizes = [4, 1, 6, 3]
    x, index = _sparse_sets(sizes)
    expected = aggr(x, index)
    moved = aggr.to(device)
    xd = x.to(device).requires_grad_(True)
    out = moved(xd, index.to(device))
    assert out.device.type == device.type
    assert_close(out.cpu(), expected, **TOL64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    shuffled = perm[torch.argsort(index[perm], stable=True)].to(device)    # nodes shuffled inside each graph
    assert not torch.equal(shuffled.cpu(), torch.arange(x.shape[0]))
    assert_close(moved(xd[shuffled], index.to(device)[shuffled]), out, **TOL64)
    out.sum().backward()
    assert torch.isfinite(xd.grad).all()
