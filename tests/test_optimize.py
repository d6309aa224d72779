import pytest
import torch
from torch.testing import assert_close

from setperm import PermutationOptimization
from setperm.functional import (optimize_permutation, permutation_cost, permutation_cost_gradient, permutation_entropy,
                                sinkhorn)


def antisymmetric(B, N, g, K=None):
    shape = (B, N, N) if K is None else (B, K, N, N)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    return A - A.transpose(-1, -2)


def literal_permutation_cost(P, C):
    """Eq. 1 written with explicit loops over positions."""
    B, N, _ = P.shape
    out = torch.zeros(B, dtype=P.dtype)
    for k in range(N):
        after = P[:, :, k + 1:].sum(-1)        # sum_{k'>k} P_jk'
        before = P[:, :, :k].sum(-1)           # sum_{k'<k} P_jk'
        out = out + (C * P[:, :, k].unsqueeze(2) * (after - before).unsqueeze(1)).sum((1, 2))
    return out


def test_permutation_cost_matches_eq1_and_hard_permutation_meaning():
    g = torch.Generator().manual_seed(0)
    C = antisymmetric(3, 6, g)
    P = sinkhorn(torch.randn(3, 6, 6, generator=g, dtype=torch.float64))
    assert_close(permutation_cost(C, P), literal_permutation_cost(P, C), rtol=1e-12, atol=1e-12)
    # hard permutation: each pair contributes C_ij if i is placed before j, else C_ji
    perm = torch.randperm(6, generator=g)               # element perm[k] at position k
    Ph = torch.zeros(1, 6, 6, dtype=torch.float64)
    Ph[0, perm, torch.arange(6)] = 1
    pos = torch.empty(6, dtype=torch.long)
    pos[perm] = torch.arange(6)
    expected = sum(C[0, i, j] if pos[i] < pos[j] else C[0, j, i] for i in range(6) for j in range(6) if i != j)
    assert_close(permutation_cost(C[:1], Ph)[0], expected, rtol=1e-12, atol=1e-12)


def test_eq4_equals_autograd_of_eq1():
    g = torch.Generator().manual_seed(1)
    C = antisymmetric(4, 7, g)
    P = torch.rand(4, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)   # any P, not only DS
    (auto,) = torch.autograd.grad(permutation_cost(C, P).sum(), P)
    assert_close(permutation_cost_gradient(C, P), auto, rtol=1e-12, atol=1e-12)


def test_lattice_permutation_cost_is_sum_of_row_and_column_costs():
    g = torch.Generator().manual_seed(2)
    R, Cc = 2, 3
    N = R * Cc
    C = antisymmetric(2, N, g, K=2)
    P = sinkhorn(torch.randn(2, N, N, generator=g, dtype=torch.float64), iters=10)
    G = P.view(2, N, R, Cc)
    one_by_one = sum(permutation_cost(C[:, 0], G[:, :, r, :].contiguous()) for r in range(R))       # left-to-right
    one_by_one = one_by_one + sum(permutation_cost(C[:, 1], G[:, :, :, c].contiguous()) for c in range(Cc))  # top-down
    assert_close(permutation_cost(C, P, grid=(R, Cc)), one_by_one, rtol=1e-12, atol=1e-12)
    Pg = P.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(permutation_cost(C, Pg, grid=(R, Cc)).sum(), Pg)
    assert_close(permutation_cost_gradient(C, P, grid=(R, Cc)), auto, rtol=1e-12, atol=1e-12)


def test_descent_lowers_cost_and_sharpens():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 10, generator=g, dtype=torch.float64)
    C = (x.unsqueeze(2) - x.unsqueeze(1)).unsqueeze(1)       # C_ij = x_i - x_j: sort descending is optimal
    C = C / C.pow(2).sum((-2, -1), keepdim=True).sqrt()
    P0 = optimize_permutation(C, steps=0)
    P6 = optimize_permutation(C, eta=10.0, steps=6)
    assert (permutation_cost(C, P6) < permutation_cost(C, P0) - 1e-3).all()
    assert (permutation_entropy(P6) < permutation_entropy(P0)).all()


def test_return_steps_and_bad_steps():
    C = torch.zeros(1, 1, 4, 4)
    steps = optimize_permutation(C, steps=3, return_steps=True)
    assert len(steps) == 4
    assert_close(steps[0], torch.full((1, 4, 4), 0.25), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="steps"):
        optimize_permutation(C, steps=-1)


@pytest.mark.parametrize("permutation,grid", [("po-u", None), ("po-la", None), ("po-u", (2, 2))])
def test_gradcheck_whole_optimizer(permutation, grid):
    torch.manual_seed(4)
    N = 4
    po = PermutationOptimization(3, cost_hidden=5, steps=2, permutation=permutation, num_positions=N, grid=grid,
                                 sinkhorn_iters=3).double()
    for p in po.parameters():
        torch.nn.init.normal_(p, std=0.7)
    x = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
    mask = None if grid else torch.tensor([[True, False, True, True], [True] * 4])
    params = [p for p in po.parameters()]

    def f(x, *ps):
        with torch.no_grad():
            for p, v in zip(params, ps):
                p.copy_(v)
        return po(x, mask=mask)

    assert torch.autograd.gradcheck(lambda x: po(x, mask=mask), (x,))
    # parameters, including eta, receive gradients and they are correct
    for p in params:
        p0 = p.detach().clone().requires_grad_(True)

        def g(v, p=p):
            return torch.func.functional_call(po, {n: (v if q is p else q) for n, q in po.named_parameters()},
                                              (x.detach(),), {"mask": mask})
        assert torch.autograd.gradcheck(g, (p0,))


def test_entropy_bounds():
    n = 5
    U = torch.full((1, n, n), 1.0 / n)
    assert_close(permutation_entropy(U), torch.log(torch.tensor([float(n)])), rtol=1e-6, atol=1e-6)
    assert_close(permutation_entropy(torch.eye(n).unsqueeze(0)), torch.zeros(1), rtol=0, atol=0)
    assert_close(permutation_entropy(U, torch.zeros(1, n, dtype=torch.bool)), torch.zeros(1), rtol=0, atol=0)


def test_empty_sets():
    """N = 0 and B = 0: empty results, entropy 0 (not the NaN of a mean over nothing)."""
    for B, N in ((2, 0), (0, 3)):
        P = torch.zeros(B, N, N, dtype=torch.float64, requires_grad=True)
        C = torch.zeros(B, 1, N, N, dtype=torch.float64)
        assert permutation_cost(C, P).shape == (B,) and permutation_cost_gradient(C, P).shape == (B, N, N)
        assert optimize_permutation(C, steps=2).shape == (B, N, N)
        assert torch.equal(permutation_entropy(P), torch.zeros(B, dtype=torch.float64))
        permutation_cost(C, P).sum().backward()


@pytest.mark.parametrize("call, message", [
    (lambda C: optimize_permutation(C[..., :3]), "C must have shape"),                       # not square
    (lambda C: optimize_permutation(C, torch.zeros(2, 4, 4, device="meta")), "init_logits is on meta"),
    (lambda C: optimize_permutation(C, steps=True), "steps must be an int"),
    (lambda C: optimize_permutation(C, sinkhorn_iters=2.0), "sinkhorn_iters must be an int"),
    (lambda C: optimize_permutation(C, temperature=float("nan")), "temperature must be a number > 0"),
    (lambda C: PermutationOptimization(3, cost_hidden=True), "hidden"),
    (lambda C: PermutationOptimization(3, steps=True), "steps must be an int"),
    (lambda C: PermutationOptimization(3, grid=(2, True)), "grid's cols must be a positive int"),
    (lambda C: PermutationOptimization(3, logit_clip=-1.0), "logit_clip must be a number > 0"),
    (lambda C: PermutationOptimization(True), "in_features must be a positive int"),
    (lambda C: permutation_entropy(torch.eye(4, dtype=torch.long)[None]), "P must be a floating-point"),
])
def test_arguments_are_checked_with_their_names(call, message):
    """A bool is no count or size (True == 1 in Python), a NaN no temperature, a non-square C no
    cost, and a start on another device than the cost is named, not a device error from inside."""
    C = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match=message):
        call(C)


def test_numpy_integers_and_floats_are_taken_as_numbers():
    np = pytest.importorskip("numpy")
    po = PermutationOptimization(np.int64(3), cost_hidden=4, steps=np.int64(2), temperature=np.float32(0.5))
    assert po.steps == 2 and isinstance(po.steps, int)
    assert po(torch.randn(2, 5, 3)).shape == (2, 5, 5)
    # every size: the widths of f, the positions of PO-LA and LinAssign, the ordering features
    from setperm import LinAssign, PairwiseCost, PermutationSetEncoder
    po = PermutationOptimization(3, cost_hidden=np.int64(4), permutation="po-la", num_positions=np.int64(6))
    assert po.cost_hidden == 4 and po.num_positions == 6 and isinstance(po.num_positions, int)
    assert po(torch.randn(2, 5, 3)).shape == (2, 5, 5)
    assert PermutationOptimization(3, cost_hidden=[np.int64(4), 5]).cost_hidden == (4, 5)
    assert PairwiseCost(3, (np.int32(4), np.int64(2))).hidden_sizes == (4, 2)
    assert LinAssign(3, np.int64(6)).num_positions == 6
    enc = PermutationSetEncoder(3, 4, PermutationOptimization(2, cost_hidden=4), order_features=np.int64(2))
    assert enc.order_features == 2
    with pytest.raises(ValueError, match="cost_hidden must be a positive int"):
        PermutationOptimization(3, cost_hidden=16.0)


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf"), 3.0])
@pytest.mark.parametrize("with_init", [False, True])
def test_padding_has_no_influence_whatever_it_holds(fill, with_init):
    """A cost and a start whose padded rows and columns hold anything (NaN, inf, a large value)
    give each set's P, and gradients, of the set alone; each padded element stays one-hot at its
    fixed position and its entries get zero gradient."""
    g = torch.Generator().manual_seed(5)
    sizes, N = [5, 2, 0, 6], 6
    mask = torch.arange(N) < torch.tensor(sizes)[:, None]
    pairs = mask[:, :, None] & mask[:, None, :]
    C = antisymmetric(len(sizes), N, g)
    init = torch.randn(len(sizes), N, N, generator=g, dtype=torch.float64)
    Cp = torch.where(pairs, C, torch.tensor(fill, dtype=torch.float64)).requires_grad_(True)
    initp = torch.where(mask[:, :, None], init, torch.tensor(fill, dtype=torch.float64)).requires_grad_(True)
    P = optimize_permutation(Cp, initp if with_init else None, mask, eta=0.8, steps=3)
    W = torch.randn(P.shape, generator=g, dtype=torch.float64)
    (P * W).sum().backward()
    for b, n in enumerate(sizes):
        Cb = C[b:b + 1, :n, :n].clone().requires_grad_(True)
        ib = init[b:b + 1, :n, :n].clone().requires_grad_(True)
        alone = optimize_permutation(Cb, ib if with_init else None, eta=0.8, steps=3)
        (alone * W[b:b + 1, :n, :n]).sum().backward()
        assert_close(P[b, :n, :n], alone[0], rtol=0, atol=1e-12)
        assert torch.equal(P[b, n:, n:], torch.eye(N - n, dtype=torch.float64))
        assert_close(Cp.grad[b, :n, :n], Cb.grad[0], rtol=0, atol=1e-12)
        if with_init:
            assert_close(initp.grad[b, :n, :n], ib.grad[0], rtol=0, atol=1e-12)
    assert torch.equal(Cp.grad[~pairs], torch.zeros_like(Cp.grad[~pairs]))
    if with_init:
        assert torch.equal(initp.grad[~mask], torch.zeros_like(initp.grad[~mask]))


@pytest.mark.parametrize("eta, message", [
    (-0.5, "eta must be a finite number >= 0"),                  # a negative step climbs the cost
    (float("nan"), "eta must be a finite number >= 0"),
    (float("inf"), "eta must be a finite number >= 0"),
    (True, "eta must be a finite number >= 0"),
    (torch.ones(4), r"one element, got a torch.float32 tensor of shape \(4,\)"),   # (N,): would scale positions
    (torch.ones(2), r"one element, got a torch.float32 tensor of shape \(2,\)"),   # (B,)
    (torch.ones((), dtype=torch.long), "floating-point tensor of one element"),
])
def test_the_step_size_is_checked_with_its_name(eta, message):
    C = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match=message):
        optimize_permutation(C, eta=eta)


def test_a_one_element_step_size_tensor_scales_every_set_alike():
    g = torch.Generator().manual_seed(8)
    C = antisymmetric(3, 5, g)
    want = optimize_permutation(C, eta=0.7, steps=3)
    for eta in (torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)):
        eta = eta.requires_grad_(True)
        P = optimize_permutation(C, eta=eta, steps=3)
        assert_close(P, want, rtol=0, atol=1e-14)
        P.sum().backward()
        assert eta.grad is not None and eta.grad.shape == eta.shape
    assert_close(optimize_permutation(C, eta=0.0, steps=3), sinkhorn(torch.zeros(3, 5, 5, dtype=torch.float64)))


@pytest.mark.parametrize("eta_init", [0.0, -1.0, float("nan"), float("inf"), True])
def test_eta_init_must_be_a_finite_positive_number(eta_init):
    # 0: d|eta|/deta is 0 there, so the learned step size could never leave it; NaN or inf: NaN outputs
    with pytest.raises(ValueError, match="eta_init must be a finite number > 0"):
        PermutationOptimization(3, eta_init=eta_init)


@pytest.mark.parametrize("call", [optimize_permutation, permutation_cost, permutation_cost_gradient])
@pytest.mark.parametrize("grid, message", [
    ("23", "grid must be \\(rows, cols\\)"), ((2, 3, 1), "grid must be \\(rows, cols\\)"),
    ((2.0, 3.0), "grid's rows must be a positive int"), ((0, 6), "grid's rows must be a positive int")])
def test_the_functions_check_grid_with_its_name(call, grid, message):
    C = torch.zeros(1, 2, 6, 6)
    args = (C,) if call is optimize_permutation else (C, torch.full((1, 6, 6), 1 / 6))
    with pytest.raises(ValueError, match=message):
        call(*args, grid=grid)


@pytest.mark.parametrize("permutation", ["po-u", "po-la"])
def test_a_lattice_takes_an_empty_batch(permutation):
    # B = 0 (an empty last batch, a rank's empty shard) gives an empty P, as for sequences
    from setperm import PermutationSetEncoder
    po = PermutationOptimization(3, cost_hidden=4, steps=2, grid=(2, 3), permutation=permutation)
    x = torch.randn(0, 6, 3, requires_grad=True)
    P = po(x)
    assert P.shape == (0, 6, 6)
    P.sum().backward()
    C, P0 = torch.zeros(0, 2, 6, 6), torch.zeros(0, 6, 6)
    assert permutation_cost(C, P0, grid=(2, 3)).shape == (0,)
    assert permutation_cost_gradient(C, P0, grid=(2, 3)).shape == (0, 6, 6)
    assert optimize_permutation(C, grid=(3, 2), steps=2).shape == (0, 6, 6)
    h = PermutationSetEncoder(3, 5, po)(torch.randn(0, 6, 3))
    assert h.shape == (0, 5)


def test_the_unrolled_steps_build_the_masks_assignment_once(monkeypatch):
    """Every Sinkhorn normalisation of one optimisation sees the same padded batch: what the mask
    makes of the logits (allowed and pinned entries) is built once, not at each of the T + 1
    normalisations (about ten operations each, kernel launches on a GPU); values as sinkhorn's."""
    import setperm.masking
    import setperm.sinkhorn
    from setperm.optimize import position_balance

    calls = []
    real = setperm.masking.assignment_mask
    monkeypatch.setattr(setperm.sinkhorn, "assignment_mask", lambda m: calls.append(1) or real(m))
    torch.manual_seed(3)
    mask = torch.arange(7) < torch.tensor([7, 4, 1, 0])[:, None]
    C = torch.randn(4, 7, 7, dtype=torch.float64) * (mask.unsqueeze(2) & mask.unsqueeze(1))
    steps = optimize_permutation(C, mask=mask, eta=0.7, steps=3, return_steps=True, kernel="chunked")
    assert len(calls) == 1
    logits = torch.zeros(4, 7, 7, dtype=torch.float64)
    for P in steps:
        assert_close(P, sinkhorn(logits, mask=mask))
        logits = logits - 2 * 0.7 * C @ position_balance(P)


@pytest.mark.parametrize("call, message", [
    # an integer cost gave an integer P (its uniform 1 / N rounded to 0) with steps=0, torch's
    # dtype errors from inside otherwise
    (lambda C, P: optimize_permutation(C.long(), steps=0), "C must be a real floating-point tensor, got dtype torch.int64"),
    (lambda C, P: optimize_permutation(C > 0), "C must be a real floating-point tensor, got dtype torch.bool"),
    (lambda C, P: optimize_permutation(C.to(torch.complex64)), "C must be a real floating-point tensor"),
    (lambda C, P: permutation_cost(C.long(), P), "C must be a real floating-point tensor"),
    (lambda C, P: permutation_cost(C, P.long()), "P must be a real floating-point tensor, got dtype torch.int64"),
    (lambda C, P: permutation_cost(C, P.tolist()), "P must be a tensor of shape \\(B, N, M\\), got list"),
    (lambda C, P: permutation_cost_gradient(C.double(), P), "P has dtype torch.float32 but C has torch.float64"),
    (lambda C, P: permutation_cost(C, P.to("meta")), "P is on meta but C is on cpu"),
])
def test_the_cost_functions_check_the_dtype_and_device_of_c_and_p(call, message):
    C = torch.zeros(2, 4, 4)
    P = torch.full((2, 4, 4), 0.25)
    with pytest.raises(ValueError, match=message):
        call(C, P)
