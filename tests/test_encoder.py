import pytest
import torch
from torch.testing import assert_close

from setperm import LinAssign, PermutationOptimizer, PermutationSetEncoder

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make_encoder(dtype, permutation="po-u", seed=0, D=5):
    torch.manual_seed(seed)
    enc = PermutationSetEncoder(D, hidden_size=12, cost_hidden=16, steps=3, permutation=permutation,
                                num_positions=16 if permutation == "po-la" else None)
    return enc.to(dtype)


def pad_randomly(x, w, N, g, fill=float("-inf")):
    """Scatter the n real elements of one set into N slots at random places; garbage elsewhere."""
    n, D = x.shape
    slots = torch.randperm(N, generator=g)[:n]
    xp = torch.full((N, D), fill, dtype=x.dtype)
    wp = torch.full((N,), fill, dtype=x.dtype)
    xp[slots], wp[slots] = x, w
    mask = torch.zeros(N, dtype=torch.bool)
    mask[slots] = True
    return xp, wp, mask, slots


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("permutation", ["po-u", "po-la", "none"])
def test_padded_equals_unpadded(dtype, permutation):
    g = torch.Generator().manual_seed(1)
    enc = make_encoder(dtype, permutation)
    sizes = [1, 3, 7, 11, 16]
    N = 16
    sets = [torch.randn(n, 5, generator=g, dtype=dtype) for n in sizes]
    ws = [torch.randn(n, generator=g, dtype=dtype) for n in sizes]
    alone = torch.cat([enc(x[None], weights=w[None]) for x, w in zip(sets, ws)])
    padded = [pad_randomly(x, w, N, g, fill=float("nan") if i % 2 else float("-inf"))
              for i, (x, w) in enumerate(zip(sets, ws))]
    xp = torch.stack([p[0] for p in padded])
    wp = torch.stack([p[1] for p in padded])
    mask = torch.stack([p[2] for p in padded])
    if permutation == "none":
        # "LSTM only" reads the input order: keep the real elements in their order
        for b, (x, w) in enumerate(zip(sets, ws)):
            slots = mask[b].nonzero().flatten()
            xp[b, slots], wp[b, slots] = x, w
    h = enc(xp, mask=mask, weights=wp)
    assert torch.isfinite(h).all()
    assert_close(h, alone, **TOL[dtype])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariance_and_row_equivariance(seed):
    g = torch.Generator().manual_seed(seed)
    enc = make_encoder(torch.float64, seed=seed)
    N, n = 10, 7
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    xp1, wp1, m1, slots1 = pad_randomly(x, w, N, g)
    perm = torch.randperm(n, generator=g)
    xp2, wp2, m2, slots2 = pad_randomly(x[perm], w[perm], N, g)
    h1, P1 = enc(xp1[None], mask=m1[None], weights=wp1[None], return_permutation=True)
    h2, P2 = enc(xp2[None], mask=m2[None], weights=wp2[None], return_permutation=True)
    assert_close(h1, h2, rtol=1e-10, atol=1e-10)
    # element perm[k] of set 1 sits in slot slots2[k] of set 2: its row of P is the same
    assert_close(P2[0, slots2][:, :n], P1[0, slots1[perm]][:, :n], rtol=1e-10, atol=1e-10)


def test_lengths_equals_prefix_mask():
    enc = make_encoder(torch.float64)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 0])
    mask = torch.arange(6) < lengths[:, None]
    assert_close(enc(x, lengths=lengths), enc(x, mask=mask), rtol=0, atol=0)


def test_degenerate_sets():
    enc = make_encoder(torch.float32)
    # one element: the identity
    h, P = enc(torch.randn(2, 1, 5), return_permutation=True)
    assert_close(P, torch.ones(2, 1, 1), rtol=0, atol=0)
    # zero real elements: a zero vector, no NaN, finite gradients
    x = torch.full((2, 4, 5), float("-inf"), requires_grad=True)
    mask = torch.tensor([[False] * 4, [True, False, False, False]])
    x2 = torch.where(mask[..., None], torch.randn(2, 4, 5), x)
    h, P = enc(x2, mask=mask, return_permutation=True)
    assert torch.equal(h[0], torch.zeros(12)) and torch.isfinite(h).all() and torch.isfinite(P).all()
    h.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    # identical elements: all costs zero -> uniform assignment
    same = torch.ones(1, 5, 5) * 0.3
    h, P = enc(same, return_permutation=True)
    assert_close(P, torch.full((1, 5, 5), 0.2), rtol=0, atol=1e-6)
    assert torch.isfinite(h).all()


def test_eta_is_positive_learnable_and_initialised_to_one():
    enc = make_encoder(torch.float32)
    assert_close(enc.eta, torch.tensor(1.0))
    enc(torch.randn(4, 6, 5)).pow(2).sum().backward()
    assert enc.permute.eta_param.grad is not None and enc.permute.eta_param.grad != 0
    with torch.no_grad():
        enc.permute.eta_param.fill_(-0.5)
    assert_close(enc.eta, torch.tensor(0.5))
    assert make_encoder(torch.float32, "none").eta is None
    assert LinAssign(3, num_positions=4).eta is None


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_autocast_finite(half):
    enc = make_encoder(torch.float32)
    x = torch.randn(3, 9, 5) * 50
    with torch.autocast("cpu", dtype=half):
        h, P = enc(x, mask=torch.rand(3, 9) > 0.3, return_permutation=True)
    assert torch.isfinite(h.float()).all() and torch.isfinite(P.float()).all()


def test_po_la_and_linassign_variable_sizes():
    torch.manual_seed(3)
    po = PermutationOptimizer(4, cost_hidden=8, steps=2, init="linear", num_positions=10)
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    P = po(x, mask=mask)
    assert_close(P[1, mask[1]][:, :3].sum(0), torch.ones(3), rtol=0, atol=1e-5)
    la = LinAssign(4, num_positions=6)
    assert la.cost is None and la(x).shape == (2, 6, 6)
    with pytest.raises(ValueError, match="num_positions"):
        LinAssign(4, num_positions=3)(x)


def test_lattice_optimizer_shapes():
    po = PermutationOptimizer(4, cost_hidden=8, steps=2, grid=(2, 3))
    assert po.cost.channels == 2
    P = po(torch.randn(5, 6, 4))
    assert P.shape == (5, 6, 6)
    assert_close(P.sum(1), torch.ones(5, 6), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        po(torch.randn(1, 5, 4))


def test_return_steps_length():
    po = PermutationOptimizer(1, cost_hidden=4, steps=4)
    steps = po(torch.rand(2, 5, 1), return_steps=True)
    assert len(steps) == 5 and all(s.shape == (2, 5, 5) for s in steps)


@pytest.mark.parametrize("call,match", [
    (lambda e: e(torch.randn(4, 5)), r"x must have shape \(B, N, D\), got shape \(4, 5\)"),
    (lambda e: e(torch.randn(2, 4, 3)), r"5 features"),
    (lambda e: e(torch.randn(2, 4, 5), mask=torch.ones(2, 3, dtype=torch.bool)), r"mask must have shape"),
    (lambda e: e(torch.randn(2, 4, 5), mask=torch.ones(2, 4)), r"mask must be a bool tensor.*float32"),
    (lambda e: e(torch.randn(2, 4, 5), weights=torch.ones(2, 5)), r"weights must have shape"),
    (lambda e: e(torch.randn(2, 4, 5), lengths=torch.tensor([1, 5])), r"lengths must lie in \[0, N=4\]"),
    (lambda e: e(torch.randn(2, 4, 5), lengths=torch.tensor([1])), r"lengths must have shape"),
    (lambda e: e(torch.randn(2, 4, 5).int()), r"floating-point"),
    (lambda e: e(torch.tensor([[[float("nan")] * 5]])), r"non-finite"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_encoder(torch.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="steps"):
        PermutationOptimizer(3, steps=-1)
    with pytest.raises(ValueError, match="init"):
        PermutationOptimizer(3, init="random")
    with pytest.raises(ValueError, match="permutation"):
        PermutationSetEncoder(3, permutation="sorted")
    with pytest.raises(ValueError, match="num_positions"):
        PermutationOptimizer(3, init="linear")


def test_check_finite_can_be_turned_off():
    enc = PermutationSetEncoder(5, 8, cost_hidden=8, check_finite=False)
    x = torch.randn(1, 3, 5)
    x[0, 1, 0] = float("inf")
    enc(x)   # no error raised: the caller opted out of the check


def test_encoder_gradcheck_with_mask_and_weights():
    enc = make_encoder(torch.float64)
    x = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    assert torch.autograd.gradcheck(lambda x, w: enc(x, mask=mask, weights=w), (x, w))


def test_lstm_only_permutation_keeps_real_order_and_moves_padding_last():
    enc = make_encoder(torch.float64, "none")
    x = torch.randn(1, 5, 5, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, False, True]])
    h, P = enc(x, mask=mask, return_permutation=True)
    from setperm import apply_permutation
    assert_close(apply_permutation(x, P)[0, :3], x[0, [1, 2, 4]], rtol=0, atol=0)
    assert_close(h, enc(x[:, [1, 2, 4]]), rtol=1e-12, atol=1e-12)
