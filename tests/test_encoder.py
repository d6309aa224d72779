import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing import assert_close

from setperm import LinAssign, PermutationOptimization, PermutationSetEncoder

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make_po(permutation, D, num_positions=None, **kw):
    """The permutation module of a variant name, ready for the encoder (None for "none")."""
    if permutation == "none":
        return None
    if permutation == "linassign":
        return LinAssign(D, num_positions)
    return PermutationOptimization(D, permutation=permutation, num_positions=num_positions, **kw)


def make_encoder(dtype, permutation="po-u", seed=0, D=5):
    torch.manual_seed(seed)
    po = make_po(permutation, D, 16 if permutation == "po-la" else None, cost_hidden=16, steps=3)
    enc = PermutationSetEncoder(D, 12, po)
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


SIZES = [1, 3, 7, 11, 16]


def padded_sets(enc, g, N=16):
    """Sets of SIZES (float64, D = 5) with relevance logits, each encoded alone, and the same sets
    scattered into one padded batch with NaN / -inf garbage: (sizes, sets, ws, alone, xp, wp, mask)."""
    sets = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in SIZES]
    ws = [torch.randn(n, generator=g, dtype=torch.float64) for n in SIZES]
    alone = torch.cat([enc(x[None], weights=w[None]) for x, w in zip(sets, ws)])
    padded = [pad_randomly(x, w, N, g, fill=float("nan") if i % 2 else float("-inf"))
              for i, (x, w) in enumerate(zip(sets, ws))]
    xp, wp, mask = (torch.stack([p[j] for p in padded]) for j in range(3))
    return SIZES, sets, ws, alone, xp, wp, mask


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
    assert enc.po.eta_param.grad is not None and enc.po.eta_param.grad != 0
    with torch.no_grad():
        enc.po.eta_param.fill_(-0.5)
    assert_close(enc.eta, torch.tensor(0.5))
    assert make_encoder(torch.float32, "none").eta is None
    assert LinAssign(3, num_positions=4).eta is None


def _cpu_autocast_takes(dtype: torch.dtype) -> bool:
    # (torch 2.0 and 2.1 disable CPU autocast for float16 with a warning, and then refuse a nested
    # autocast region)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast("cpu", dtype=dtype), torch.autocast("cpu", enabled=False):
                pass
        except RuntimeError:
            return False
        with torch.autocast("cpu", dtype=dtype):
            return torch.is_autocast_cpu_enabled()


HALVES = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not _cpu_autocast_takes(torch.float16), reason="this torch's CPU autocast has no float16"))]


@pytest.mark.parametrize("half", HALVES)
def test_half_autocast_finite(half):
    enc = make_encoder(torch.float32)
    x = torch.randn(3, 9, 5) * 50
    with torch.autocast("cpu", dtype=half):
        h, P = enc(x, mask=torch.rand(3, 9) > 0.3, return_permutation=True)
    assert torch.isfinite(h.float()).all() and torch.isfinite(P.float()).all()


def test_po_la_and_linassign_variable_sizes():
    torch.manual_seed(3)
    po = PermutationOptimization(4, cost_hidden=8, steps=2, permutation="po-la", num_positions=10)
    x = torch.randn(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    P = po(x, mask=mask)
    assert_close(P[1, mask[1]][:, :3].sum(0), torch.ones(3), rtol=0, atol=1e-5)
    la = LinAssign(4, num_positions=6)
    assert la.cost is None and la(x).shape == (2, 6, 6)
    with pytest.raises(ValueError, match="num_positions"):
        LinAssign(4, num_positions=3)(x)


def test_lattice_optimizer_shapes():
    po = PermutationOptimization(4, cost_hidden=8, steps=2, grid=(2, 3))
    assert po.cost.channels == 2
    P = po(torch.randn(5, 6, 4))
    assert P.shape == (5, 6, 6)
    assert_close(P.sum(1), torch.ones(5, 6), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        po(torch.randn(1, 5, 4))


def test_return_steps_length():
    po = PermutationOptimization(1, cost_hidden=4, steps=4)
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
        PermutationOptimization(3, steps=-1)
    with pytest.raises(ValueError, match=r"permutation must be one of \('po-u', 'po-la'\).*got 'random'"):
        PermutationOptimization(3, permutation="random")
    for alias in ("uniform", "linear", "PO-U", "none", "linassign"):      # one vocabulary, no aliases
        with pytest.raises(ValueError, match="permutation must be one of"):
            PermutationOptimization(3, permutation=alias, num_positions=4)
    with pytest.raises(ValueError, match=r"po must be a PermutationOptimization or LinAssign module, 'po-u' or None, "
                                         r"got 'sorted'"):
        PermutationSetEncoder(3, 4, "sorted")
    with pytest.raises(ValueError, match="num_positions"):
        PermutationOptimization(3, permutation="po-la")
    with pytest.raises(ValueError, match="po orders 3 features but the encoder gives it 5"):
        PermutationSetEncoder(5, 4, PermutationOptimization(3))
    with pytest.raises(TypeError):
        PermutationOptimization(3, init="uniform")              # the old keyword is gone


def test_check_finite_can_be_turned_off():
    """check_finite=False skips the input check and nothing else: a finite input gives exactly what the
    checked encoder gives, a non-finite one is passed through instead of refused."""
    enc = PermutationSetEncoder(5, 8, check_finite=False)
    checked = PermutationSetEncoder(5, 8)
    checked.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 5)
    assert_close(enc(x), checked(x), rtol=0, atol=0)
    x[0, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        checked(x)
    h = enc(x)   # no error raised: the caller opted out of the check
    assert h.shape == (1, 8) and not torch.isfinite(h).all()


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
    from setperm.functional import apply_permutation
    assert_close(apply_permutation(x, P)[0, :3], x[0, [1, 2, 4]], rtol=0, atol=0)
    assert_close(h, enc(x[:, [1, 2, 4]]), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- variants and steps

def test_variant_vocabulary_and_default_steps():
    # one default T = 4 (section 2.2, the mosaics) for the module, the functional form and the encoder's "po-u"
    assert PermutationOptimization(3).steps == 4
    assert PermutationOptimization(3, permutation="po-u").permutation == "po-u"
    la = LinAssign(3, 5)
    assert la.steps == 0 and la.cost is None and la.eta is None and la.linear is not None
    assert la.permutation == "linassign"
    with pytest.raises(TypeError):
        LinAssign(3, 5, steps=2)                    # T = 0 is what LinAssign is
    pola = PermutationOptimization(3, permutation="po-la", num_positions=5)
    assert pola.steps == 4 and pola.cost is not None and pola.linear is not None
    assert PermutationSetEncoder(3, 4).po.steps == 4
    assert PermutationSetEncoder(3, 4, PermutationOptimization(3, cost_hidden=4, steps=3)).po.steps == 3   # F.4
    enc = PermutationSetEncoder(3, 4, LinAssign(3, 5))
    assert enc.po.steps == 0 and enc.eta is None
    assert PermutationSetEncoder(3, 4, None).po is None


def test_default_po_is_the_module_with_its_defaults():
    torch.manual_seed(0)
    enc = PermutationSetEncoder(3, 4)
    torch.manual_seed(0)
    po = PermutationOptimization(3)
    assert repr(enc.po) == repr(po).replace("check_finite=None", "check_finite=False")
    assert all(torch.equal(a, b) for a, b in zip(enc.po.state_dict().values(), po.state_dict().values()))


def test_linassign_class_equals_po_la_without_steps():
    torch.manual_seed(0)
    a = LinAssign(3, num_positions=6, logit_clip=10.0)
    torch.manual_seed(0)
    b = PermutationOptimization(3, steps=0, permutation="po-la", num_positions=6, logit_clip=10.0)
    assert a.state_dict().keys() == b.state_dict().keys() and repr(a.linear) == repr(b.linear)
    x = torch.randn(2, 5, 3)
    assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("permutation", ["po-u", "po-la", "linassign"])
def test_encoder_reads_through_its_optimizer(permutation):
    """The encoder's P is its optimiser's output on the zero-padded elements (public call)."""
    enc = make_encoder(torch.float64, permutation if permutation != "linassign" else "po-u")
    if permutation == "linassign":
        torch.manual_seed(0)
        enc = PermutationSetEncoder(5, 12, LinAssign(5, 16)).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    _, P = enc(x, mask=mask, return_permutation=True)
    assert_close(P, enc.po(x, mask=mask), rtol=0, atol=0)


# ----------------------------------------------------------------------------- empty batches and sets

@pytest.mark.parametrize("permutation", ["po-u", "po-la", "none"])
@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5), (0, 0, 5)])
def test_empty_batch_or_empty_sets(permutation, shape):
    """B = 0 -> h (0, H); N = 0 -> h = zeros(B, H), P (B, 0, 0); backward works (zero gradients)."""
    enc = make_encoder(torch.float64, permutation)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    for kwargs in ({}, {"mask": torch.zeros(shape[:2], dtype=torch.bool)}, {"lengths": torch.zeros(shape[0], dtype=torch.long)},
                   {"weights": torch.randn(shape[:2], dtype=torch.float64)}):
        enc.zero_grad()
        h, P = enc(x, return_permutation=True, **kwargs)
        assert h.shape == (shape[0], 12) and P.shape == (shape[0], shape[1], shape[1])
        assert torch.equal(h, torch.zeros_like(h))
        h.sum().backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in enc.parameters() if p.grad is not None)


@pytest.mark.parametrize("permutation", ["po-u", "po-la", "linassign"])
@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5)])
def test_empty_optimizer_inputs(permutation, shape):
    po = make_po(permutation, 5, 4, cost_hidden=4, steps=6)
    x = torch.randn(*shape, requires_grad=True)
    P = po(x)
    assert P.shape == (shape[0], shape[1], shape[1])
    steps = po(x, return_steps=True)
    assert len(steps) == po.steps + 1 and all(s.shape == P.shape for s in steps)
    if P.requires_grad:
        P.sum().backward()


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_must_match_the_module(dtype):
    enc = make_encoder(torch.float32)
    with pytest.raises(ValueError, match=f"x has dtype {dtype} but the module's parameters are torch.float32"):
        enc(torch.randn(2, 4, 5).to(dtype))
    with pytest.raises(ValueError, match=f"x has dtype {dtype} but the module's parameters are torch.float32"):
        enc.po(torch.randn(2, 4, 5).to(dtype))
    with pytest.raises(ValueError, match=f"weights has dtype {dtype}"):
        enc(torch.randn(2, 4, 5), weights=torch.randn(2, 4).to(dtype))
    po64 = PermutationOptimization(5, cost_hidden=4, steps=6, dtype=torch.float64)
    assert po64(torch.randn(2, 4, 5, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="x has dtype torch.float32 but the module's parameters are torch.float64"):
        po64(torch.randn(2, 4, 5))


@pytest.mark.parametrize("half", HALVES)
def test_half_inputs_under_autocast(half):
    """Under autocast the half-precision input of a float32 module is accepted (autocast computes
    both in its dtype); float64 is not cast by autocast and still raises."""
    enc = make_encoder(torch.float32)
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(3, 9, 5, generator=g) * 50).to(half), torch.randn(3, 9, generator=g).to(half)
    mask = torch.rand(3, 9, generator=g) > 0.3
    with torch.autocast("cpu", dtype=half):
        h, P = enc(x, mask=mask, weights=w, return_permutation=True)
        with pytest.raises(ValueError, match="float64"):
            enc(x.double())
    assert torch.isfinite(h.float()).all() and torch.isfinite(P.float()).all()
    ref = enc(x.float(), mask=mask, weights=w.float())
    # the same computation in half precision (bfloat16 keeps 8 bits of mantissa, float16 11)
    assert_close(h.float(), ref, rtol=0, atol=0.3 if half == torch.bfloat16 else 0.05)


@pytest.mark.parametrize("module_dtype", HALVES)
@pytest.mark.parametrize("permutation", ["po-u", "po-la", "linassign", "none"])
def test_a_half_precision_module_takes_float32_input_under_autocast(module_dtype, permutation, cpu_autocast_lstm_runs):
    """A module cast to half precision (``.bfloat16()``) with float32 input under autocast: the
    pairwise cost's products meet one dtype (a float32 first layer and a half-precision last one
    did not)."""
    torch.manual_seed(0)
    enc = PermutationSetEncoder(5, 8, make_po(permutation, 5, 9, cost_hidden=6, steps=2)).to(module_dtype)
    x = torch.randn(3, 9, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, P = enc(x, mask=mask, return_permutation=True)
        h.float().square().sum().backward()
    assert torch.isfinite(h.float()).all() and torch.isfinite(P.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- huge finite inputs

@pytest.mark.parametrize("permutation", ["po-u", "po-la", "linassign", "none"])
@pytest.mark.parametrize("value", [1e38, -1e38, 3.4e38])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_finite_inputs_near_the_float32_limit_give_finite_outputs(permutation, value, rnn):
    torch.manual_seed(0)
    enc = PermutationSetEncoder(13, 16, make_po(permutation, 13, 8, cost_hidden=16, steps=3), rnn=rnn)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 13, generator=g)
    x[0, 1] = value                                               # one huge element
    x[1] = value * torch.randn(8, 13, generator=g).sign()         # a whole set of huge values, mixed signs
    x[2, :, 0] = value                                            # one huge feature
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[3, 5:] = False
    w = torch.randn(4, 8, generator=g)
    h, P = enc(x, mask=mask, weights=w, return_permutation=True)
    assert torch.isfinite(h).all() and torch.isfinite(P).all()
    assert_close(P[:3].sum(1), torch.ones(3, 8), rtol=0, atol=1e-5)
    # the ordinary set is untouched by its neighbours' magnitude
    assert_close(h[3:], enc(x[3:, :5], weights=w[3:, :5]), rtol=1e-5, atol=1e-6)


def test_lattice_po_la_near_the_float32_limit():
    torch.manual_seed(2)
    po = PermutationOptimization(13, cost_hidden=8, steps=2, permutation="po-la", grid=(2, 3))
    x = 3.4e38 * torch.randn(2, 6, 13, generator=torch.Generator().manual_seed(3)).sign()
    P = po(x)
    assert torch.isfinite(P).all()
    assert_close(P.sum(1), torch.ones(2, 6), rtol=0, atol=1e-5)


def test_state_dict_keys_name_the_po_submodule():
    enc = make_encoder(torch.float64)
    assert {k.split(".", 1)[0] for k in enc.state_dict()} == {"po", "lstm"}
    other = make_encoder(torch.float64, seed=5)
    other.load_state_dict(enc.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), enc.state_dict().values()))
    old = {k.replace("po.", "optimizer.", 1): v for k, v in enc.state_dict().items()}
    with pytest.raises(RuntimeError, match="Missing key"):    # no renaming of former names
        other.load_state_dict(old)


# ----------------------------------------------------------------------------- straight-through hard order

def make_st_encoder(permutation="po-u", seed=0, D=5):
    torch.manual_seed(seed)
    po = make_po(permutation, D, 16 if permutation == "po-la" else None, cost_hidden=16, steps=3)
    return PermutationSetEncoder(D, 12, po, straight_through=True).double()


@pytest.mark.parametrize("permutation", ["po-u", "po-la"])
def test_straight_through_padded_equals_unpadded_and_reads_the_hard_order(permutation):
    g = torch.Generator().manual_seed(3)
    enc = make_st_encoder(permutation)
    sizes, sets, ws, alone, xp, wp, mask = padded_sets(enc, g)
    h, P = enc(xp, mask=mask, weights=wp, return_permutation=True)
    assert torch.isfinite(h).all() and torch.isfinite(P[mask]).all()
    assert_close(h, alone, **TOL[torch.float64])
    # the LSTM reads the Hungarian order of the (returned, soft) P: the same as encoding the hard-sorted
    # elements in that order with the LSTM alone
    from setperm.functional import hungarian
    idx = hungarian(P, mask=mask)
    plain = make_encoder(torch.float64, "none")
    plain.lstm.load_state_dict(enc.lstm.state_dict())
    for b, n in enumerate(sizes):
        order = idx[b, :n]
        seq = (torch.nan_to_num(xp[b, order]) * torch.sigmoid(wp[b, order]).unsqueeze(-1))[None]
        assert_close(plain(seq)[0], h[b], **TOL[torch.float64])
    # the soft path reads something else (P is not hard at initialisation)
    soft = make_encoder(torch.float64, permutation, D=5)
    soft.load_state_dict(enc.state_dict())
    assert not torch.allclose(soft(xp, mask=mask, weights=wp), h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_straight_through_is_invariant_to_the_input_order(seed):
    g = torch.Generator().manual_seed(seed)
    enc = make_st_encoder(seed=seed)
    x = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    w = torch.randn(3, 9, generator=g, dtype=torch.float64)
    perm = torch.randperm(9, generator=g)
    h = enc(x, weights=w)
    assert_close(enc(x[:, perm], weights=w[:, perm]), h, **TOL[torch.float64])


def test_straight_through_gradient_is_the_soft_paths_at_the_hard_sequence():
    """The straight-through identity: d loss / d theta = (dP/d theta)^T (d loss / dP) with d loss / dP taken
    at the hard sequence, i.e. the gradient of <apply_permutation(x, P), g> for g = d loss / d seq_hard."""
    from setperm.functional import apply_permutation, hungarian
    enc = make_st_encoder()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, True, False], [True] * 6])
    target = torch.randn(2, 12, generator=g, dtype=torch.float64)
    ((enc(x, mask=mask) - target) ** 2).sum().backward()
    st_grads = {k: p.grad.clone() for k, p in enc.po.named_parameters()}
    enc.zero_grad()
    # by hand: the LSTM on the hard sequence gives g; the optimiser's parameters get <P^T x, g>'s gradient
    P = enc.po(x, mask=mask)
    _, P_hard = hungarian(P, mask=mask, return_matrix=True)
    seq = apply_permutation(x.masked_fill(~mask.unsqueeze(-1), 0), P_hard).requires_grad_(True)
    from torch.nn.utils.rnn import pack_padded_sequence
    n = mask.sum(1)
    _, (_, c) = enc.lstm(pack_padded_sequence(seq, n, batch_first=True, enforce_sorted=False))
    (g_seq,) = torch.autograd.grad(((c[-1] - target) ** 2).sum(), seq)
    (apply_permutation(x.masked_fill(~mask.unsqueeze(-1), 0), P) * g_seq).sum().backward()
    for k, p in enc.po.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
        assert_close(st_grads[k], p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5), (3, 4, 5)])
def test_straight_through_empty_batches_and_sets_give_no_nan(shape):
    enc = make_st_encoder()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    for mask in (None, torch.zeros(shape[:2], dtype=torch.bool)):
        enc.zero_grad()
        h, P = enc(x, mask=mask, return_permutation=True)
        assert h.shape == (shape[0], 12) and P.shape == (shape[0], shape[1], shape[1])
        assert torch.isfinite(h).all()
        if mask is not None:
            assert torch.equal(h, torch.zeros_like(h))
        h.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
        assert x.grad is None or torch.isfinite(x.grad).all()


def test_straight_through_argument_and_repr():
    assert "straight_through=True" in repr(make_st_encoder())
    assert "straight_through=False" in repr(make_encoder(torch.float64))
    assert not make_encoder(torch.float64).straight_through
    with pytest.raises(ValueError, match="straight_through"):
        PermutationSetEncoder(5, 8, None, straight_through=True)
    with pytest.raises(ValueError, match="straight_through"):
        PermutationSetEncoder(5, 8, straight_through=1)


# ----------------------------------------------------------------------------- the LSTM readout's two paths

@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_the_readout_paths_give_the_same_values_and_gradients(num_layers, rnn):
    """packed, grouped and (one layer) padded: the same final states and gradients, padding unread."""
    from setperm.encoder import last_state
    torch.manual_seed(0)
    lstm = (torch.nn.LSTM if rnn == "lstm" else torch.nn.GRU)(5, 7, num_layers=num_layers, batch_first=True).double()
    lengths = torch.tensor([3, 0, 6, 1, 3, 6, 2])
    seq = torch.randn(7, 6, 5, dtype=torch.float64)
    seq[0, 4] = float("nan")                            # in the padding: never read, no NaN gradient
    methods = ("packed", "grouped", "padded") if num_layers == 1 else ("packed", "grouped")
    out = {}
    for method in methods:
        x = seq.clone().requires_grad_(True)
        lstm.zero_grad()
        h = last_state(lstm, x, lengths, method=method)
        (h * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum().backward()
        out[method] = (h.detach(), x.grad.clone(), [p.grad.clone() for p in lstm.parameters()])
    for method in methods:
        assert torch.equal(out[method][0][1], torch.zeros(7, dtype=torch.float64))     # length 0: zero state
        # padding beyond each length is never read
        assert torch.equal(out[method][1][0, 3:], torch.zeros(3, 5, dtype=torch.float64))
        assert_close(out[method][0], out["packed"][0], rtol=1e-12, atol=1e-13)
        assert_close(out[method][1], out["packed"][1], rtol=1e-12, atol=1e-13)
        for a, b in zip(out[method][2], out["packed"][2]):
            assert_close(a, b, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="method"):
        last_state(lstm, seq, lengths, method="fast")
    if num_layers == 2:
        with pytest.raises(ValueError, match="method='padded'.*num_layers=2"):
            last_state(lstm, seq, lengths, method="padded")


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
@pytest.mark.parametrize("proj_size, bias", [(0, False), (4, True)])
def test_padded_readout_holds_the_cell_state_in_float32(proj_size, bias):
    """The LSTM's cell state held over the padded steps (no host lengths) is as close to float64 as
    the CPU's own float32 cell state of the packed read, over long sequences and saturating gates."""
    from setperm.encoder import last_state
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(13, 32, batch_first=True, proj_size=proj_size, bias=bias)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(3.0)                                  # gates near 0 and 1
    lengths = torch.tensor([300, 0, 1, 157, 299, 40])
    seq = torch.randn(6, 300, 13)
    exact = last_state(lstm.double(), seq.double(), lengths, method="grouped")
    lstm.float()
    scale = exact.abs().max()
    packed = (last_state(lstm, seq, lengths, method="packed").double() - exact).abs().max() / scale
    h = last_state(lstm, seq, lengths, method="padded")
    padded = (h.double() - exact).abs().max() / scale
    assert padded < max(10 * packed, 1e-5)
    assert torch.equal(h[1], torch.zeros_like(h[1]))


def test_padded_readout_holds_the_cell_under_a_huge_recurrent_part():
    """The hold logit outweighs any gate's recurrent part below 59,000: biases of up to 50,000
    (every real step's gates saturated too) still give the grouped read's state, which never reads
    padding (a hold that a gate's bias could overturn would let the padded steps write the cell)."""
    from setperm.encoder import last_state
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(5, 8, batch_first=True).double()
    with torch.no_grad():
        lstm.bias_ih_l0.uniform_(-5e4, 5e4)
        lstm.weight_hh_l0.mul_(100.0)
    lengths = torch.tensor([7, 2, 0, 5])
    seq = torch.randn(4, 7, 5, dtype=torch.float64)
    assert_close(last_state(lstm, seq, lengths, method="padded"), last_state(lstm, seq, lengths, method="grouped"),
                 rtol=1e-12, atol=1e-12)


def test_padded_readout_under_bfloat16_autocast(cpu_autocast_lstm_runs):
    """The reader runs in bfloat16; the held cell state stays as close to float32 as that allows."""
    from setperm.encoder import last_state
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(13, 32, batch_first=True)
    seq, lengths = torch.randn(8, 20, 13), torch.tensor([20, 0, 1, 7, 19, 20, 3, 11])
    exact = last_state(lstm, seq, lengths, method="packed")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = last_state(lstm, seq, lengths, method="padded")
    assert torch.isfinite(h).all() and torch.equal(h[1].float(), torch.zeros(32))
    assert_close(h.float(), exact, rtol=0, atol=0.03)


@pytest.mark.parametrize("read,masked", [("auto", False), ("padded", True), ("grouped", True), ("packed", True)])
def test_where_the_cpus_lstm_refuses_autocast_the_encoder_reads_in_float32_warned(monkeypatch, read, masked):
    """On CPUs whose oneDNN has no bfloat16 LSTM (x86 without AVX-512) torch's LSTM raises under CPU
    autocast; the encoder then reads its sequence in the reader's float32, autocast off, and warns
    with the reason, instead of failing (stood in here by an LSTM that refuses autocast)."""
    from setperm._compat import autocast_enabled

    message = "could not create a primitive descriptor for the LSTM forward propagation primitive"
    inputs = []

    def refusing(real):
        def lstm(*args, **kwargs):
            if autocast_enabled("cpu"):
                raise RuntimeError(message)
            inputs.append((args[0].data if hasattr(args[0], "batch_sizes") else args[0]).dtype)
            return real(*args, **kwargs)
        return lstm
    monkeypatch.setattr(torch._VF, "lstm", refusing(torch._VF.lstm))       # what nn.LSTM calls
    monkeypatch.setattr(torch, "lstm", refusing(torch.lstm))               # what the padded read calls
    torch.manual_seed(0)
    enc = PermutationSetEncoder(5, 6, read=read)
    x = torch.randn(3, 7, 5, requires_grad=True)
    kw = {"mask": torch.arange(7) < torch.tensor([7, 4, 2])[:, None]} if masked else {}
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="primitive descriptor"):
        h = enc(x, **kw)
    assert inputs and set(inputs) == {torch.float32}                      # the read ran in float32
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    h.sum().backward()
    assert torch.isfinite(x.grad).all() and enc.lstm.weight_hh_l0.grad.abs().sum() > 0
    with warnings.catch_warnings():                                         # no autocast: nothing to fall back from
        warnings.simplefilter("error")
        enc(x, **kw)


def test_a_read_that_fails_in_float32_too_raises_its_first_error(monkeypatch):
    from setperm._compat import autocast_enabled

    def failing(*args, **kwargs):
        raise RuntimeError("the first error" if autocast_enabled("cpu") else "the second error")
    monkeypatch.setattr(torch._VF, "lstm", failing)
    enc = PermutationSetEncoder(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="the first error"):
        enc(torch.randn(2, 4, 5))


def test_auto_readout_reads_host_lengths_packed_and_device_lengths_padded(monkeypatch):
    from setperm import encoder as encoder_mod
    from setperm.encoder import last_state
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    seq, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 0])
    calls = []
    monkeypatch.setattr(encoder_mod, "host_decisions", lambda t: False)            # the path CUDA takes
    monkeypatch.setattr(encoder_mod, "pack_padded_sequence",
                        lambda *a, **k: calls.append("packed") or pack_padded_sequence(*a, **k))
    padded = last_state(lstm, seq, lengths)
    assert calls == []
    packed = last_state(lstm, seq, lengths, host_lengths=lengths.clone())
    assert calls == ["packed"]
    assert_close(padded, packed, rtol=1e-5, atol=1e-6)
    last_state(torch.nn.LSTM(3, 4, num_layers=2, batch_first=True), seq, lengths)    # deeper: packed
    assert calls == ["packed", "packed"]


# ---------------------------------------------------------------------------------------------
# order_features / order_by: the permutation optimised on a separate sort key
# ---------------------------------------------------------------------------------------------

def make_keyed_encoder(permutation="po-u", seed=0, D=5, E=2):
    torch.manual_seed(seed)
    po = make_po(permutation, E, 16 if permutation == "po-la" else None, cost_hidden=16, steps=3)
    return PermutationSetEncoder(D, 12, po, order_features=E).double()


@pytest.mark.parametrize("permutation", ["po-u", "po-la"])
def test_order_by_alone_decides_the_permutation(permutation):
    g = torch.Generator().manual_seed(7)
    enc = make_keyed_encoder(permutation)
    x = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)
    key = torch.randn(3, 8, 2, generator=g, dtype=torch.float64)
    h, P = enc(x, order_by=key, return_permutation=True)
    # other payload, same key: the same P; the same payload, another key: another P
    h2, P2 = enc(torch.randn(3, 8, 5, generator=g, dtype=torch.float64), order_by=key, return_permutation=True)
    assert_close(P2, P, **TOL[torch.float64])
    assert not torch.allclose(h2, h)
    _, P3 = enc(x, order_by=key + torch.randn(3, 8, 2, generator=g, dtype=torch.float64), return_permutation=True)
    assert not torch.allclose(P3, P, atol=1e-6)
    # it is the optimiser applied to the key, and the LSTM reads x in that soft order
    assert_close(P, enc.po(key), **TOL[torch.float64])
    # permutation invariance: permuting elements and keys together leaves h unchanged
    perm = torch.randperm(8, generator=g)
    assert_close(enc(x[:, perm], order_by=key[:, perm]), h, **TOL[torch.float64])


def test_order_by_padded_equals_unpadded_and_gradcheck():
    g = torch.Generator().manual_seed(8)
    enc = make_keyed_encoder()
    sizes, N = [1, 4, 6], 6
    sets = [torch.randn(n, 5, generator=g, dtype=torch.float64) for n in sizes]
    keys = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in sizes]
    alone = torch.cat([enc(x[None], order_by=k[None]) for x, k in zip(sets, keys)])
    xp = torch.full((3, N, 5), float("nan"), dtype=torch.float64)
    kp = torch.full((3, N, 2), float("inf"), dtype=torch.float64)
    mask = torch.zeros(3, N, dtype=torch.bool)
    for b, (x, k) in enumerate(zip(sets, keys)):
        slots = torch.randperm(N, generator=g)[: len(x)]
        xp[b, slots], kp[b, slots], mask[b, slots] = x, k, True
    assert_close(enc(xp, mask=mask, order_by=kp), alone, **TOL[torch.float64])
    x = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True, True, False], [True] * 4])
    assert torch.autograd.gradcheck(lambda a, k: enc(a, mask=m, order_by=k), (x, key), eps=1e-6, atol=1e-6)


def test_order_by_arguments_are_checked():
    enc = make_keyed_encoder()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="order_by: required"):
        enc(x)
    with pytest.raises(ValueError, match=r"order_by must have 2 features.*\(2, 4, 3\)"):
        enc(x, order_by=torch.randn(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"order_by must have shape \(B, N, 2\).*\(2, 5, 2\)"):
        enc(x, order_by=torch.randn(2, 5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="order_by has dtype torch.float32"):
        enc(x, order_by=torch.randn(2, 4, 2))
    with pytest.raises(ValueError, match="order_by.*NaN|order_by.*non-finite|order_by.*finite"):
        enc(x, order_by=torch.full((2, 4, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="order_features=None"):
        make_encoder(torch.float64)(x, order_by=torch.randn(2, 4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="po=None"):
        PermutationSetEncoder(5, 8, None, order_features=2)
    with pytest.raises(ValueError, match="order_features must be a positive int"):
        PermutationSetEncoder(5, 8, order_features=0)
    assert "order_features=2" in repr(enc)


@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5)])
def test_order_by_empty_batches_and_sets(shape):
    enc = make_keyed_encoder()
    x = torch.randn(*shape, dtype=torch.float64)
    key = torch.randn(*shape[:2], 2, dtype=torch.float64)
    h = enc(x, order_by=key)
    assert h.shape == (shape[0], 12) and torch.equal(h, torch.zeros_like(h))


# ----------------------------------------------------------------------------- pooled readout

def make_pool_encoder(pool, permutation="po-u", straight_through=False, seed=0, D=5):
    torch.manual_seed(seed)
    po = make_po(permutation, D, 16 if permutation == "po-la" else None, cost_hidden=16, steps=3)
    return PermutationSetEncoder(D, 12, po, pool=pool, straight_through=straight_through).double()


@pytest.mark.parametrize("pool", ["sum", "mean", "attention"])
@pytest.mark.parametrize("permutation,straight_through", [("po-u", False), ("po-u", True), ("po-la", False)])
def test_pool_padded_equals_unpadded_and_is_the_lstm_state_plus_the_pooled_map(pool, permutation, straight_through):
    g = torch.Generator().manual_seed(7)
    enc = make_pool_encoder(pool, permutation, straight_through)
    sizes, sets, ws, alone, xp, wp, mask = padded_sets(enc, g)
    h = enc(xp, mask=mask, weights=wp)
    assert torch.isfinite(h).all()
    assert_close(h, alone, **TOL[torch.float64])
    # the same encoder without the pooled term, plus W times the sum / mean of the weighted elements
    lstm_only = PermutationSetEncoder(5, 12, enc.po, straight_through=straight_through).double()
    lstm_only.lstm.load_state_dict(enc.lstm.state_dict())
    for b, (x, w) in enumerate(zip(sets, ws)):
        weighted = x * torch.sigmoid(w).unsqueeze(-1)
        if pool == "attention":
            att = torch.softmax(enc.pool_gate(weighted).squeeze(-1), dim=0)
            pooled = (att.unsqueeze(-1) * weighted).sum(0)
        else:
            pooled = weighted.sum(0) if pool == "sum" else weighted.mean(0)
        expected = lstm_only(x[None], weights=w[None])[0] + enc.pool_linear.weight @ pooled
        assert_close(h[b], expected, **TOL[torch.float64])


@pytest.mark.parametrize("pool", ["sum", "mean", "attention"])
def test_pool_is_invariant_and_differentiable(pool):
    g = torch.Generator().manual_seed(2)
    enc = make_pool_encoder(pool)
    x = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 8, generator=g) < 0.7
    mask[:, 0] = True
    perm = torch.randperm(8, generator=g)
    assert_close(enc(x[:, perm], mask=mask[:, perm]), enc(x, mask=mask), **TOL[torch.float64])
    xr = x[:1, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: enc(t), (xr,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("pool", ["sum", "mean", "attention"])
@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0, 5), (3, 4, 5)])
def test_pool_empty_batches_and_sets_give_zero_without_nan(pool, shape):
    enc = make_pool_encoder(pool)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    h = enc(x, mask=mask)
    assert h.shape == (shape[0], 12) and torch.equal(h, torch.zeros_like(h))
    h.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_pool_argument_repr_and_reset():
    enc = make_pool_encoder("mean")
    assert "pool='mean'" in repr(enc) and "pool=" not in repr(make_encoder(torch.float64))
    assert make_encoder(torch.float64).pool_linear is None
    for bad in ("max", 1, True, ""):
        with pytest.raises(ValueError, match="pool"):
            PermutationSetEncoder(5, 8, pool=bad)
    assert make_pool_encoder("sum").pool_gate is None and enc.pool_gate is None
    assert make_pool_encoder("attention").pool_gate.weight.shape == (1, 5)
    torch.manual_seed(3)
    fresh = PermutationSetEncoder(5, 8, None, pool="attention")
    torch.manual_seed(3)
    fresh_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh.reset_parameters()
    assert all(torch.equal(fresh_state[k], v) for k, v in fresh.state_dict().items())


# ----------------------------------------------------------------------------- GRU reader

def make_gru_encoder(permutation="po-u", straight_through=False, pool=None, seed=0, D=5):
    torch.manual_seed(seed)
    po = make_po(permutation, D, 16 if permutation == "po-la" else None, cost_hidden=16, steps=3)
    return PermutationSetEncoder(D, 12, po, rnn="gru", pool=pool, straight_through=straight_through).double()


@pytest.mark.parametrize("permutation,straight_through", [("po-u", False), ("po-u", True), ("po-la", False),
                                                          ("none", False)])
def test_gru_reader_padded_equals_unpadded_and_reads_the_sequence(permutation, straight_through):
    g = torch.Generator().manual_seed(11)
    enc = make_gru_encoder(permutation, straight_through)
    assert enc.lstm is None and isinstance(enc.gru, torch.nn.GRU) and enc.reader is enc.gru
    sizes, sets, ws, alone, xp, wp, mask = padded_sets(enc, g)
    if permutation == "none":
        for b, (x, w) in enumerate(zip(sets, ws)):
            slots = mask[b].nonzero().flatten()
            xp[b, slots], wp[b, slots] = x, w
    h, P = enc(xp, mask=mask, weights=wp, return_permutation=True)
    assert torch.isfinite(h).all()
    assert_close(h, alone, **TOL[torch.float64])
    # the set vector is the GRU's last hidden state over the permuted, weighted sequence
    from setperm.functional import apply_permutation, hungarian
    for b, n in enumerate(sizes):
        x = torch.nan_to_num(xp[b], posinf=0.0, neginf=0.0) * torch.sigmoid(torch.nan_to_num(wp[b])).unsqueeze(-1)
        x = x.masked_fill(~mask[b].unsqueeze(-1), 0)
        if straight_through:
            seq = x[hungarian(P[b:b + 1], mask=mask[b:b + 1])[0, :n]]
        else:
            seq = apply_permutation(x[None], P[b:b + 1])[0, :n]
        _, h_n = enc.gru(seq[None])
        assert_close(h[b], h_n[-1, 0], **TOL[torch.float64])


def test_gru_reader_invariance_gradcheck_and_empty_sets():
    g = torch.Generator().manual_seed(4)
    enc = make_gru_encoder(straight_through=False, pool="sum")
    x = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)
    perm = torch.randperm(8, generator=g)
    assert_close(enc(x[:, perm]), enc(x), **TOL[torch.float64])
    xr = x[:1, :5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: enc(t), (xr,), eps=1e-6, atol=1e-6)
    for shape in [(0, 4, 5), (3, 0, 5), (3, 4, 5)]:
        xe = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        h = enc(xe, mask=torch.zeros(shape[:2], dtype=torch.bool))
        assert h.shape == (shape[0], 12) and torch.equal(h, torch.zeros_like(h))
        h.sum().backward()


def test_gru_reader_argument_repr_and_init():
    enc = make_gru_encoder()
    assert "rnn='gru'" in repr(enc) and "rnn=" not in repr(make_encoder(torch.float64))
    assert set(k.split(".")[0] for k in enc.state_dict()) == {"po", "gru"}
    with pytest.raises(ValueError, match="rnn"):
        PermutationSetEncoder(5, 8, rnn="rnn")
    # Xavier per gate (three gates), zero biases, as the LSTM's four
    for name, p in enc.gru.named_parameters():
        if "bias" in name:
            assert torch.equal(p, torch.zeros_like(p))
    torch.manual_seed(5)
    fresh = PermutationSetEncoder(5, 8, None, rnn="gru")
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    torch.manual_seed(5)
    fresh.reset_parameters()
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


def test_torch_func_transforms_give_the_autograd_gradients():
    """torch.func.grad through the whole optimisation (pairwise cost, unrolled steps, Sinkhorn),
    with respect to the input and, through functional_call, to the parameters."""
    torch.manual_seed(0)
    po = PermutationOptimization(4, cost_hidden=8, steps=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.arange(5) < torch.tensor([5, 3, 1])[:, None]
    weights = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    params = {k: v.detach() for k, v in po.named_parameters()}

    def loss(params, x):
        return (torch.func.functional_call(po, params, (x,), {"mask": mask}) * weights).sum()
    grads = torch.func.grad(loss, argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(loss(dict(po.named_parameters()), xr), [xr, *po.parameters()])
    assert_close(grads[1], expected[0], rtol=1e-10, atol=1e-12)
    for (name, _), want in zip(po.named_parameters(), expected[1:]):
        assert_close(grads[0][name], want, rtol=1e-10, atol=1e-12)


def test_weights_and_order_by_on_another_device_than_x_are_named():
    """(``meta`` stands in for a GPU: the check is by device, before any arithmetic mixes them.)"""
    x = torch.randn(2, 5, 4)
    enc = PermutationSetEncoder(4, 8, PermutationOptimization(4, cost_hidden=6, steps=2))
    with pytest.raises(ValueError, match="weights is on meta but x is on cpu"):
        enc(x, weights=torch.zeros(2, 5, device="meta"))
    enc = PermutationSetEncoder(4, 8, PermutationOptimization(3, cost_hidden=6, steps=2), order_features=3)
    with pytest.raises(ValueError, match="order_by is on meta but x is on cpu"):
        enc(x, order_by=torch.zeros(2, 5, 3, device="meta"))


def test_a_hook_on_the_reader_sees_each_set_size_once_on_the_cpu(monkeypatch):
    """As the encoder's docstring says: on the CPU the reader runs once per distinct size of a
    non-empty set, on those sets without padding, when the cost model picks the grouped read (a
    forward hook on ``lstm`` fires that often), else once on the whole batch. The padded read does
    not call the reader: "auto" leaves it out for a reader with hooks, and it warns when asked for."""
    from setperm import encoder as encoder_mod
    from setperm.encoder import last_state
    torch.manual_seed(0)
    enc = PermutationSetEncoder(3, 5)
    lengths = torch.tensor([4, 2, 4, 0, 1])
    x = torch.randn(5, 4, 3)
    assert encoder_mod.auto_method(enc.lstm, x, lengths) == "padded"       # a tiny reader: one call beats three
    seen = []
    handle = enc.lstm.register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape) if isinstance(args[0], torch.Tensor) else "packed"))
    picked = encoder_mod.auto_method(enc.lstm, x, lengths)
    assert picked in ("grouped", "packed")
    enc(x, lengths=lengths)
    assert len(seen) == 3 if picked == "grouped" else seen == ["packed"]
    seen.clear()
    monkeypatch.setattr(encoder_mod, "read_costs", lambda *a, **k: {"grouped": 0.0, "padded": 1.0, "packed": 1.0})
    enc(x, lengths=lengths)
    assert sorted(seen) == [(1, 1, 3), (1, 2, 3), (2, 4, 3)]
    seen.clear()
    enc(torch.randn(5, 4, 3))
    assert seen == [(5, 4, 3)]
    with pytest.warns(RuntimeWarning, match="padded LSTM read .* forward hooks registered on it do not run"):
        last_state(enc.lstm, x, lengths, method="padded")
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        last_state(enc.lstm, x, lengths, method="padded")


@pytest.mark.parametrize("build", [
    lambda: PermutationOptimization(3, permutation="po-la", num_positions=3, grid=(2, 2)),
    lambda: LinAssign(3, 3, grid=(2, 2)),
])
def test_a_lattice_with_fewer_position_vectors_than_grid_cells_is_refused_when_built(build):
    """A grid holds exactly R * Cols elements, so fewer position vectors can never serve it: named
    at construction, not at the first forward."""
    with pytest.raises(ValueError, match=r"num_positions=3 is fewer than the 4 positions of grid \(2, 2\)"):
        build()
    assert PermutationOptimization(3, permutation="po-la", num_positions=5, grid=(2, 2)).num_positions == 5


def test_a_logit_clip_for_po_u_is_refused():
    """PO-U starts from zero logits: a clip would be dropped silently, so it is refused, naming it."""
    with pytest.raises(ValueError, match=r"logit_clip applies to permutation='po-la'.*got logit_clip=5"):
        PermutationOptimization(3, logit_clip=5)
    assert PermutationOptimization(3, permutation="po-la", num_positions=4, logit_clip=5).logit_clip == 5


@pytest.mark.parametrize("hidden, n, sizes, threads, method", [
    (16, 100, "uniform", 1, "padded"),      # many sizes, a narrow reader: the padding's arithmetic is cheap
    (256, 100, "uniform", 1, "grouped"),    # a wide reader: reading the padding costs more than the steps
    (128, 10, "uniform", 1, "packed"),      # few steps: one packed call instead of ten
    (16, 100, "full", 1, "grouped"),        # one size: one call on the sets as they are
    (192, 100, "uniform", 1, "grouped"),
    (192, 100, "uniform", 2, "padded"),     # two threads share the padded read's arithmetic
])
def test_auto_readout_on_the_cpu_takes_the_method_the_cost_model_expects_fastest(hidden, n, sizes, threads, method):
    from setperm.encoder import auto_method, read_costs
    lstm = torch.nn.LSTM(13, hidden, batch_first=True)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, n + 1, (64,), generator=gen) if sizes == "uniform" else torch.full((64,), n)
    seq = torch.zeros(64, n, 13)
    costs = read_costs(lstm, lengths, n, threads)
    assert min(costs, key=costs.get) == method
    assert auto_method(lstm, seq, lengths, threads=threads) == method
    deeper = torch.nn.LSTM(13, hidden, num_layers=2, batch_first=True)
    assert auto_method(deeper, seq, lengths, threads=threads) == "grouped"      # not modelled: as before
    assert read_costs(lstm, lengths, n, 8) == read_costs(lstm, lengths, n, 2)  # more threads count as two


def test_the_padded_read_says_nothing_about_its_weights(device):
    """The held read calls the LSTM with its own (4H, D + 1) input weights, which are no flat buffer of
    the module's: cuDNN's advice to flatten the module's weights would name a fault that is not the
    user's, so the padded read (forward and backward) raises no warning on any device."""
    from setperm.encoder import last_state
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).to(device)
    x = torch.randn(3, 5, 3, device=device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        last_state(lstm, x, torch.tensor([5, 2, 0], device=device), method="padded").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("value", [1e32, -1e32, 3.4e38, -3.4e38])
def test_the_padded_read_of_huge_elements_equals_the_grouped_one(device, value):
    """Huge elements make huge gates (-1e30, or overflowed to -inf): the padded read gives the grouped
    read's values and gradients (an earlier form of it, which recovered the cell from running sums of
    log f, rounded their differences away, wrong states, or gave NaN)."""
    from setperm.encoder import last_state
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 3, generator=gen)
    x[0, 0] = value                                            # a huge first element of a full set
    x[1, 2] = value * torch.randn(3, generator=gen).sign()     # mixed signs, in the middle
    x = x.to(device)
    lengths = torch.tensor([10, 7, 4], device=device)
    states, grads = [], []
    for method in ("grouped", "padded"):
        lstm.zero_grad()
        h = last_state(lstm, x, lengths, method=method)
        h.sum().backward()
        states.append(h)
        grads.append(lstm.weight_hh_l0.grad.clone())
    assert torch.isfinite(states[1]).all() and torch.isfinite(grads[1]).all()
    # (cuDNN's float32 cells of two batch shapes differ by a few 1e-6 at a small state: atol 1e-5)
    assert_close(states[1], states[0], rtol=1e-5, atol=1e-5)
    assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hidden, n, method", [(16, 100, "padded"), (128, 10, "packed"), (256, 100, "grouped")])
def test_auto_readout_on_the_cpu_runs_the_method_it_picks(monkeypatch, hidden, n, method):
    """``last_state(method="auto")`` runs the picked method (one thread) and gives its values."""
    from setperm import encoder as encoder_mod
    from setperm.encoder import last_state
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(13, hidden, batch_first=True)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, n + 1, (64,), generator=gen)
    seq = torch.randn(64, n, 13, generator=gen)
    calls = []
    padded, packed = encoder_mod._padded_final_state, encoder_mod.pack_padded_sequence
    monkeypatch.setattr(encoder_mod, "_padded_final_state", lambda *a: calls.append("padded") or padded(*a))
    monkeypatch.setattr(encoder_mod, "pack_padded_sequence", lambda *a, **k: calls.append("packed") or packed(*a, **k))
    h = last_state(lstm, seq, lengths)
    assert calls == ([] if method == "grouped" else [method])
    assert_close(h, last_state(lstm, seq, lengths, method=method), rtol=1e-6, atol=1e-7)
    assert_close(h, last_state(lstm, seq, lengths, method="grouped"), rtol=1e-5, atol=1e-6)
