import pytest
import torch
from torch.testing import assert_close

from setperm import PairwiseCost
from setperm.functional import pairwise_cost


def naive_cost(module: PairwiseCost, x, normalize=True):
    """The paper's literal form: concatenated pairs, f run on both orders."""
    B, N, D = x.shape
    xi = x.unsqueeze(2).expand(B, N, N, D)
    xj = x.unsqueeze(1).expand(B, N, N, D)
    C = module.pair_scores(xi, xj) - module.pair_scores(xj, xi)     # (B, N, N, K)
    C = C.movedim(-1, 1)
    if normalize:
        C = C / C.pow(2).sum((-2, -1), keepdim=True).sqrt()
    return C


@pytest.mark.parametrize("hidden,channels", [(16, 1), (8, 2), ((6, 5), 1)])
def test_matches_concatenated_pairs(hidden, channels):
    torch.manual_seed(0)
    m = PairwiseCost(3, hidden, channels=channels).double()
    for p in m.parameters():   # non-zero biases so the decomposition is really tested
        torch.nn.init.normal_(p)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    assert_close(m(x), naive_cost(m, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hidden", [8, (6, 5)])
def test_functional_form_takes_the_module_tensors(hidden):
    torch.manual_seed(0)
    m = PairwiseCost(3, hidden, channels=2).double()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    C = pairwise_cost(torch.where(mask[..., None], x, 0.0), m.first.weight, m.first.bias,
                      [(layer.weight, layer.bias) for layer in m.hidden], m.last.weight, mask)
    assert_close(C, m(x, mask), rtol=0, atol=0)


def test_antisymmetric_zero_diagonal_unit_norm():
    torch.manual_seed(1)
    m = PairwiseCost(4, 16, channels=2)
    C = m(torch.randn(3, 7, 4))
    assert_close(C, -C.transpose(-1, -2), rtol=0, atol=0)
    assert (C.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert_close(C.pow(2).sum((-2, -1)), torch.ones(3, 2), rtol=1e-5, atol=1e-6)


def test_masked_pairs_zero_and_norm_over_real_pairs():
    torch.manual_seed(2)
    m = PairwiseCost(2, 8).double()
    x = torch.randn(1, 6, 2, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False, True]])
    C = m(x, mask)
    real = mask[0].nonzero().flatten()
    assert C[0, 0][~mask[0]].abs().max() == 0 and C[0, 0][:, ~mask[0]].abs().max() == 0
    assert_close(C[0, 0][real][:, real], m(x[:, real])[0, 0], rtol=1e-12, atol=1e-12)


def test_identical_elements_zero_cost_zero_gradient():
    """A set of identical elements has cost 0, which eq. 10 cannot normalise: no gradient (not one
    divided by the norm's floor), and every parameter still takes part (DDP)."""
    m = PairwiseCost(3, 8)
    x = torch.ones(2, 5, 3, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    for kwargs in ({}, {"mask": mask}):
        C = m(x, **kwargs)
        assert (C == 0).all()
        gx, *gp = torch.autograd.grad((C * torch.randn(C.shape)).sum(), [x, *m.parameters()], allow_unused=True)
        assert (gx == 0).all() and all(g is not None and (g == 0).all() for g in gp)


def test_equal_elements_keep_the_derivative_of_the_cost():
    """F(x_i, x_j) = 0 where x_i == x_j (the value is pinned), but dF/dx_i = d1 f - d2 f is not:
    gradients through a set with repeated elements are those of the literal form (gradcheck
    moves the repeated element off its twin, so it checks this)."""
    torch.manual_seed(3)
    m = PairwiseCost(3, 7).double()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    x[0, 1] = x[0, 0]
    x[1, 4] = x[1, 2] = x[1, 0]
    mask = torch.tensor([[True] * 5, [True, True, True, False, True]])
    G = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    for kwargs in ({}, {"mask": mask}):
        xx = x.clone().requires_grad_()
        got, = torch.autograd.grad((m(xx, **kwargs) * G).sum(), xx)
        mask_ = kwargs.get("mask", torch.ones(2, 5, dtype=torch.bool))
        want, = torch.autograd.grad((naive_cost(m, torch.where(mask_[..., None], xx, 0.0)) * G
                                     * (mask_[:, None, :, None] & mask_[:, None, None, :])).sum(), xx)
        if kwargs:      # the naive norm runs over every pair: compare the masked module with its own set
            real = mask_[1].nonzero().flatten()
            alone = x[1:2, real].clone().requires_grad_()
            want_1, = torch.autograd.grad((m(alone) * G[1:2, :, real][..., real]).sum(), alone)
            assert_close(got[1, real], want_1[0], rtol=1e-10, atol=1e-12)
            assert (got[1, ~mask_[1]] == 0).all()
        else:
            assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got[0, 0].abs().max() > 1e-3                             # the twins do get a gradient
        assert torch.autograd.gradcheck(lambda t: m(t, **kwargs), (x.clone().requires_grad_(),))


def test_the_functional_form_ignores_what_padded_elements_hold():
    torch.manual_seed(4)
    m = PairwiseCost(3, 8).double()
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False]])
    real = mask[0].nonzero().flatten()
    want = m(x[:, real])
    for pad in (1e30, float("inf"), float("nan")):
        padded = torch.where(mask[..., None], x, pad)
        C = pairwise_cost(padded, m.first.weight, m.first.bias, [], m.last.weight, mask)
        assert_close(C[0, 0][real][:, real], want[0, 0], rtol=1e-12, atol=1e-12)
        assert (C[0, 0][~mask[0]] == 0).all() and (C[0, 0][:, ~mask[0]] == 0).all()


def test_the_functional_form_checks_its_input():
    m = PairwiseCost(3, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        pairwise_cost(torch.randn(5, 3), m.first.weight, m.first.bias, [], m.last.weight)
    with pytest.raises(ValueError, match="x must have 3 features"):
        pairwise_cost(torch.randn(2, 5, 4), m.first.weight, m.first.bias, [], m.last.weight)
    with pytest.raises(ValueError, match="first_weight"):
        pairwise_cost(torch.randn(2, 5, 3), m.first.weight[:, :5], m.first.bias, [], m.last.weight)


@pytest.mark.parametrize("layers, message", [
    (lambda m: (m.first.bias[:7], [], m.last.weight), r"first_bias must be None or have shape \(8,\).*got \(7,\)"),
    (lambda m: (m.first.bias, [], m.last.weight[:, :7]), r"last_weight must have shape \(K, 8\), got \(1, 7\)"),
    (lambda m: (m.first.bias, [], m.last.weight[0]), r"last_weight must have shape \(K, 8\), got \(8,\)"),
    (lambda m: (m.first.bias, [(torch.randn(5, 7), None)], torch.randn(1, 5)), r"hidden\[0\]'s weight must have shape"),
    (lambda m: (m.first.bias, [(torch.randn(5, 8), torch.randn(4))], torch.randn(1, 5)), r"hidden\[0\]'s bias"),
    (lambda m: (m.first.bias, [(torch.randn(5, 8), None)], torch.randn(1, 8)), r"last_weight must have shape \(K, 5\)"),
    (lambda m: (m.first.bias, [torch.randn(5, 8)], torch.randn(1, 5)), r"hidden\[0\] must be a \(weight, bias\) pair"),
])
def test_the_functional_form_names_each_layer_of_f(layers, message):
    m = PairwiseCost(3, 8)
    first_bias, hidden, last_weight = layers(m)
    with pytest.raises(ValueError, match=message):
        pairwise_cost(torch.randn(2, 5, 3), m.first.weight, first_bias, hidden, last_weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        PairwiseCost(3, 0)
    with pytest.raises(ValueError, match="channels"):
        PairwiseCost(3, 4, channels=0)


def test_kernel_argument_checked():
    with pytest.raises(ValueError, match="kernel"):
        PairwiseCost(3, 4, kernel="fast")
    with pytest.raises(ValueError, match="two-layer"):
        PairwiseCost(3, (4, 4), kernel="compiled")


def test_a_padded_batch_takes_the_hash_test_of_equal_elements(monkeypatch):
    # zeroed padding is a run of equal elements; they must not send the batch to the element-wise
    # comparison (O(B N^2 D), the slowest step of a padded forward on the CPU), while equal real
    # elements still do, and get a zero cost
    import setperm.cost as cost_module

    def elementwise(*args):
        raise AssertionError("element-wise comparison of the elements")

    m = PairwiseCost(3, 8).double()
    torch.manual_seed(6)
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor([7, 4, 2])[:, None]
    with monkeypatch.context() as patched:
        patched.setattr(cost_module, "_rows_per_chunk", elementwise)
        C = m(x, mask)
    for b, n in enumerate((7, 4, 2)):
        assert_close(C[b, :, :n, :n], m(x[b:b + 1, :n])[0], rtol=1e-12, atol=1e-12)
    twins = x.clone()
    twins[1, 3] = twins[1, 0]
    same = cost_module.equal_pairs(twins, mask)
    literal = (twins[:, :, None] == twins[:, None, :]).all(-1) & mask[:, :, None] & mask[:, None, :]
    assert torch.equal(same & mask[:, :, None] & mask[:, None, :], literal)
    assert (m(twins, mask)[1, 0, 0, 3] == 0).all()


def test_hooks_on_the_layers_of_f_are_named_as_never_run_and_parametrizations_train():
    # forward reads f's weights (the pairs of eq. 8 are never built), so a hook on a layer never
    # runs: a pruned or (old-style) spectral-normed layer would silently keep the weight its hook
    # computed last; torch.nn.utils.parametrize recomputes the weight at every read, and trains
    import warnings

    from torch.nn.utils import parametrizations, prune

    torch.manual_seed(7)
    x = torch.randn(2, 5, 3)
    mask = torch.arange(5) < torch.tensor([5, 3])[:, None]
    m = PairwiseCost(3, 8, channels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no hooks: nothing to say
        C = m(x, mask)
    handle = m.first.register_forward_hook(lambda *args: None)
    with pytest.warns(RuntimeWarning, match="layer 'first' and never calls it .* forward hooks registered on it"):
        assert_close(m(x, mask), C, rtol=0, atol=0)
    handle.remove()
    prune.l1_unstructured(m.last, "weight", amount=0.5)
    with pytest.warns(RuntimeWarning, match="layer 'last' .* forward pre-hooks .*torch.nn.utils.prune"):
        m(x, mask)
    deep = PairwiseCost(3, (6, 4))
    deep.hidden[0].register_full_backward_hook(lambda *args: None)
    with pytest.warns(RuntimeWarning, match="layer 'hidden.0' .* backward hooks"):
        deep(x, mask)

    m = PairwiseCost(3, 8)
    parametrizations.spectral_norm(m.first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (m(x, mask) * torch.randn(2, 1, 5, 5)).sum().backward()
    original = m.first.parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().sum() > 0


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_the_cost_is_contiguous_per_channel(channels):
    # each channel's (N, N) matrix is contiguous, as the optimisation's per-channel matrix
    # products and eq. 10's per-channel max and norm read it; with several channels (a lattice's
    # two) the pairwise MLP's output has the channel innermost, and a strided cost made every
    # reduction and product over it several times slower
    torch.manual_seed(7)
    m = PairwiseCost(3, 8, channels=channels)
    x = torch.randn(4, 6, 3, requires_grad=True)
    mask = torch.arange(6) < torch.tensor([6, 3, 5, 1])[:, None]
    for C in (m(x), m(x, mask), pairwise_cost(x, m.first.weight, m.first.bias, [], m.last.weight,
                                              normalize=False)):
        assert C.shape == (4, channels, 6, 6) and C.is_contiguous()


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_reach_every_input_of_the_two_layer_cost_exactly(with_bias):
    """float64 first and second derivatives of the two-layer cost with respect to the elements and
    every weight (the projections are recomputed in backward, so they reach the first layer through
    the recomputation), on a padded batch."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    w1 = torch.randn(4, 6, dtype=torch.float64, generator=g)
    b1 = torch.randn(4, dtype=torch.float64, generator=g)
    w2 = torch.randn(1, 4, dtype=torch.float64, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    leaves = [t.clone().requires_grad_() for t in ((x, w1, b1, w2) if with_bias else (x, w1, w2))]

    def cost(*t):
        x, w1, *rest = t
        b1, w2 = rest if with_bias else (None, rest[0])
        return pairwise_cost(x, w1, b1, [], w2, mask=mask, kernel="chunked")

    assert torch.autograd.gradcheck(cost, leaves)
    assert torch.autograd.gradgradcheck(cost, leaves)


def _normalized_by_the_chain(C, eps=1e-12):
    """Eq. 10 as plain operations (what normalize_cost computes, with autograd's chain as backward)."""
    m = C.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(eps)
    unit = C / m
    return unit / unit.pow(2).sum(dim=(-2, -1), keepdim=True).clamp_min(1.0).sqrt()


@pytest.mark.parametrize("scale", [1.0, 1e-13, 0.0])
def test_normalize_cost_backward_in_closed_form_is_the_chains(scale):
    """The closed-form backward gives the chain of operations' first and second derivatives, also
    where the norm is clamped (costs below eps) and for a zero cost; the values are the same bits."""
    from setperm.cost import normalize_cost

    g = torch.Generator().manual_seed(3)
    C = (torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=g) * scale).requires_grad_()
    up, up2 = (torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=g) for _ in range(2))
    assert torch.equal(normalize_cost(C), _normalized_by_the_chain(C))
    got, want = (torch.autograd.grad(f(C), C, up, create_graph=True)[0]
                 for f in (normalize_cost, _normalized_by_the_chain))
    assert_close(got, want, rtol=1e-12, atol=1e-300)
    second = [torch.autograd.grad((d * up2).sum(), C, allow_unused=True)[0] for d in (got, want)]
    second = [torch.zeros_like(C) if s is None else s for s in second]
    assert_close(second[0], second[1], rtol=1e-12, atol=1e-300 if scale else 0.0)
    if scale == 1.0:
        assert torch.autograd.gradcheck(normalize_cost, (C,))
        assert torch.autograd.gradgradcheck(normalize_cost, (C,))


def test_normalize_cost_keeps_its_result_for_backward_and_nothing_of_its_size_beside():
    from setperm.cost import normalize_cost

    C = torch.randn(4, 1, 30, 30, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = normalize_cost(C * 1.0)
    big = [t for t in saved if t.numel() == C.numel()]
    assert len(big) == 1 and big[0].data_ptr() == out.data_ptr()
    assert sum(t.numel() for t in saved) < C.numel() + 4 * 4


def _tail_inputs(channels, masked, seed=5):
    """Pairwise scores ``g`` (B, N, N, K) and elements with twins, a set of equal elements and a
    padded set (with a mask)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(4, 6, 6, channels, dtype=torch.float64, generator=gen)
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=gen)
    x[0, 1] = x[0, 0]
    x[2] = 0.5                                     # every element equal: cost 0, no gradient
    mask = None
    if masked:
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[1, 3:] = False
        mask[3, 0] = False
        x = torch.where(mask[..., None], x, 0.0)   # (padding zeroed, as the cost hands it on)
    return g, x, mask


def _tail_by_the_chain(g, x, mask):
    """Eq. 8 and 10 from ``g`` as plain operations, with autograd's chain as backward."""
    from setperm.cost import _antisymmetric, equal_pairs
    from setperm.masking import pair_mask

    C, _ = _antisymmetric(g, equal_pairs(x, mask), pair_mask(mask))
    return _normalized_by_the_chain(C)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_the_cost_tail_in_closed_form_is_the_chains(channels, masked):
    """Eq. 8 and 10 after the pairwise scores, as one autograd function with a closed-form backward:
    the chain of operations' values and first and second derivatives, with twins, a set of equal
    elements (no gradient) and padding (none through padded pairs)."""
    from setperm.cost import NORM_EPS, _CostTail

    g, x, mask = _tail_inputs(channels, masked)
    g = g.requires_grad_()

    def tail(g):
        return _CostTail.apply(g, x, mask, NORM_EPS, "chunked")[0]
    assert_close(tail(g), _tail_by_the_chain(g, x, mask), rtol=1e-15, atol=1e-15)
    up = torch.randn(4, channels, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    up2 = torch.randn(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, want = (torch.autograd.grad(f(g), g, up, create_graph=True)[0]
                 for f in (tail, lambda g: _tail_by_the_chain(g, x, mask)))
    assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert (got[2] == 0).all()
    if masked:
        assert (got[1, 3:] == 0).all() and (got[1, :, 3:] == 0).all() and (got[3, 0] == 0).all()
    second = [torch.autograd.grad((d * up2).sum(), g)[0] for d in (got, want)]
    assert_close(second[0], second[1], rtol=1e-12, atol=1e-14)
    # (gradcheck without the twins: their cost's value is pinned, not its derivative, by design)
    x[0, 1] += 1.0

    def tail(g):
        return _CostTail.apply(g, x, mask, NORM_EPS, "chunked")[0]
    assert torch.autograd.gradcheck(tail, (g,))
    assert torch.autograd.gradgradcheck(tail, (g,))


def test_the_cost_tail_keeps_its_result_and_nothing_else_of_its_size():
    from setperm.cost import NORM_EPS, _CostTail

    g, x, mask = _tail_inputs(1, True)
    g = g.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = _CostTail.apply(g * 1.0, x.float(), mask, NORM_EPS, "chunked")[0]
    floats = [t for t in saved if t.is_floating_point() and t.numel() == g.numel()]
    assert len(floats) == 1 and floats[0].data_ptr() == y.data_ptr()
    assert sum(t.numel() for t in saved if t.is_floating_point()) < g.numel() + 4 * 4


needs_compiler = pytest.mark.usefixtures("inductor_builds_on_cpu")


@pytest.mark.usefixtures("torch_compile_runs", "fresh_compiler")
@pytest.mark.parametrize("channels", [1, 2])
def test_the_compiled_cost_tail_equals_the_plain_one_with_exact_derivatives(channels, device, request):
    """kernel="compiled" runs eq. 8 and 10 as two compiled functions (forward, backward; on CUDA
    Triton kernels): the plain operations' values and gradients, and second derivatives (through
    the plain backward)."""
    from setperm.cost import NORM_EPS, _CostTail

    if device.type == "cpu":
        request.getfixturevalue("inductor_builds_on_cpu")     # (C++ kernels there)
    for masked in (False, True):
        g, x, mask = (t if t is None else t.to(device) for t in _tail_inputs(channels, masked, seed=6))
        g = g.requires_grad_()
        plain, compiled = (lambda g, k=kernel: _CostTail.apply(g, x, mask, NORM_EPS, k)[0]
                           for kernel in ("chunked", "compiled"))
        assert_close(compiled(g), plain(g), rtol=1e-14, atol=1e-15)
        up = torch.randn(4, channels, 6, 6, dtype=torch.float64, device=device)
        assert_close(torch.autograd.grad(compiled(g), g, up)[0], torch.autograd.grad(plain(g), g, up)[0],
                     rtol=1e-12, atol=1e-14)
        x[0, 1] += 1.0                                 # (see the test above)
        assert torch.autograd.gradgradcheck(compiled, (g,))


@needs_compiler
def test_equal_pairs_under_torch_compile_is_the_elementwise_test():
    """Traced by torch.compile, the test of equal elements is the fused element-wise comparison:
    -0.0 equals 0.0, NaN equals nothing, elements differing in one bit differ."""
    from setperm.cost import equal_pairs

    x = torch.randn(2, 7, 3)
    x[0, 1] = x[0, 0]
    x[0, 2] = -x[0, 0].abs() * 0.0                     # -0.0 beside
    x[0, 3] = 0.0
    x[1, 4] = x[1, 5] = float("nan")
    x[1, 6] = torch.nextafter(x[1, 0], torch.tensor(2.0))
    literal = (x.unsqueeze(2) == x.unsqueeze(1)).all(-1)
    assert torch.equal(torch.compile(equal_pairs, fullgraph=True, dynamic=True)(x), literal)


def test_the_cost_tail_past_the_recompile_limit_is_the_plain_one(monkeypatch, recompile_limit_error):
    """Where dynamo refuses one more specialisation of eq. 8 and 10, plain operations give the same
    values and gradients, with a warning that names them."""
    from setperm import pairwise as pairwise_mod
    from setperm.cost import NORM_EPS, _cost_tail, _cost_tail_grad, _CostTail

    compiled = pairwise_mod._compiled

    def refuse(*args):
        raise recompile_limit_error

    monkeypatch.setattr(pairwise_mod, "_compiled",
                        lambda fn: refuse if fn in (_cost_tail, _cost_tail_grad) else compiled(fn))
    g, x, mask = _tail_inputs(1, True)
    g = g.requires_grad_()
    with pytest.warns(RuntimeWarning, match="recompile limit was reached for eq. 8 and 10"):
        got = _CostTail.apply(g, x, mask, NORM_EPS, "compiled")[0]
        grad = torch.autograd.grad(got.pow(3).sum(), g)[0]
    want = _CostTail.apply(g, x, mask, NORM_EPS, "chunked")[0]
    assert torch.equal(got, want)
    assert torch.equal(grad, torch.autograd.grad(want.pow(3).sum(), g)[0])


def _two_layer_inputs(channels, masked, device=None, seed=8):
    """A padded batch with twins and a set of equal elements, and the two-layer f's weights, float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 4, dtype=torch.float64, generator=gen)
    x[0, 1] = x[0, 0]
    x[2] = 0.5
    w1, b1 = torch.randn(5, 8, dtype=torch.float64, generator=gen), torch.randn(5, dtype=torch.float64, generator=gen)
    w2 = torch.randn(channels, 5, dtype=torch.float64, generator=gen)
    mask = (torch.arange(6) < torch.tensor([6, 4, 5])[:, None]) if masked else None
    return [t if t is None else t.to(device) for t in (x, w1, b1, w2, mask)]


@pytest.mark.usefixtures("torch_compile_runs", "fresh_compiler")
@pytest.mark.parametrize("channels", [1, 2])
def test_the_compiled_two_layer_cost_equals_the_chunked_one_with_exact_derivatives(channels, device, request):
    """kernel="compiled" runs the two-layer f with eq. 8 and 10 as one compiled function each way
    (on CUDA Triton kernels): the chunked kernel's values and gradients of every input, and second
    derivatives (through the plain backward)."""
    if device.type == "cpu":
        request.getfixturevalue("inductor_builds_on_cpu")     # (C++ kernels there)
    for masked in (False, True):
        x, w1, b1, w2, mask = _two_layer_inputs(channels, masked, device)
        leaves = [t.requires_grad_() for t in (x, w1, b1, w2)]
        chunked, compiled = (lambda *t, k=kernel: pairwise_cost(t[0], t[1], t[2], [], t[3], mask, kernel=k)
                             for kernel in ("chunked", "compiled"))
        assert_close(compiled(*leaves), chunked(*leaves), rtol=1e-13, atol=1e-14)
        up = torch.randn(3, channels, 6, 6, dtype=torch.float64, device=device)
        for got, want in zip(torch.autograd.grad(compiled(*leaves), leaves, up),
                             torch.autograd.grad(chunked(*leaves), leaves, up)):
            assert_close(got, want, rtol=1e-11, atol=1e-13)
        # (gradgradcheck on elements without twins or an all-equal set: their cost is pinned to 0,
        # which a perturbation of the elements undoes)
        leaves[0] = torch.randn(x.shape, dtype=torch.float64, device=device).requires_grad_()
        assert torch.autograd.gradgradcheck(compiled, leaves)


def test_the_compiled_two_layer_cost_is_one_compiled_function_each_way(monkeypatch):
    """The pairwise MLP and eq. 8 and 10 are one compiled function forward and one backward (each a
    compiled region whose entry costs the host), none of the four they were apart."""
    from setperm import pairwise as pairwise_mod

    called = []
    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: called.append(fn.__name__) or fn)
    for masked in (False, True):
        called.clear()
        x, w1, b1, w2, mask = _two_layer_inputs(1, masked)
        leaves = [t.requires_grad_() for t in (x, w1, b1, w2)]
        got = pairwise_cost(*leaves[:3], [], leaves[3], mask, kernel="compiled")
        grads = torch.autograd.grad(got.pow(3).sum(), leaves)
        assert called == ["_two_layer_cost", "_two_layer_cost_grad"]
        want = pairwise_cost(*leaves[:3], [], leaves[3], mask, kernel="chunked")
        assert_close(got, want, rtol=1e-13, atol=1e-14)
        for g, w in zip(grads, torch.autograd.grad(want.pow(3).sum(), leaves)):
            assert_close(g, w, rtol=1e-11, atol=1e-13)


@pytest.mark.usefixtures("torch_compile_runs", "fresh_compiler")
@pytest.mark.parametrize("channels", [1, 2])
def test_the_cost_in_a_models_torch_compile_writes_no_pairwise_product(channels, device, request):
    """Traced into a model's own ``torch.compile`` graph (the projections a and c computed in the
    same graph), the cost's backward keeps its (B, N, N, K, H) products inside the reductions that
    sum them: its peak memory stays below half of one such product (inductor once wrote it out and
    read it back twice), with the eager values and gradients."""
    if device.type == "cpu":
        request.getfixturevalue("inductor_builds_on_cpu")     # (C++ kernels there)
    torch.manual_seed(0)
    B, N, H = 4, 24, 64
    cost = PairwiseCost(5, H, channels=channels).double().to(device)
    x = torch.randn(B, N, 5, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.arange(N, device=device) < torch.tensor([24, 20, 9, 1], device=device)[:, None]
    up = torch.randn(B, channels, N, N, dtype=torch.float64, device=device)
    compiled = torch.compile(cost, fullgraph=True)    # (one graph, or an error: never the eager call)

    def call(fn):
        out = fn(x, mask)
        return (out, *torch.autograd.grad(out, [x, *cost.parameters()], up))
    for got, want in zip(call(compiled), call(cost)):
        assert_close(got, want, rtol=1e-10, atol=1e-12)
    product = B * N * N * channels * H * x.element_size()
    # (what the GPU benchmark's memory columns read on CUDA; torch's CPU allocator, counted, on the CPU)
    from benchmarks.allocations import peak_allocated
    from benchmarks.gpu import peak_memory
    if device.type == "cuda":
        peak, parts = peak_memory(lambda: call(compiled), device), "(CUDA)"
    else:
        peak, parts = peak_allocated(lambda: call(compiled))
    assert peak < product / 2, (peak, product, parts)


def test_the_two_layer_cost_keeps_its_result_and_the_elements_and_nothing_else_of_their_size():
    x, w1, b1, w2, mask = _two_layer_inputs(1, True)
    x, w1, b1, w2 = (t.float() for t in (x, w1, b1, w2))
    x = x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pairwise_cost(x, w1, b1, [], w2, mask, kernel="chunked")
    floats = [t for t in saved if t.is_floating_point()]
    assert [t.data_ptr() for t in floats if t.numel() == y.numel()] == [y.data_ptr()]
    # beside y: the scaled elements (B, N, D) and small tensors; no (B, N, N, K) g, no (B, N, H) a or c
    others = [t for t in floats if t.data_ptr() != y.data_ptr()]
    assert sum(t.numel() for t in others if t.dim() == 3 and t.shape[-1] == x.shape[-1]) <= 2 * x.numel()
    assert all(t.numel() < y.numel() for t in others), [tuple(t.shape) for t in others]


def test_the_two_layer_cost_past_the_recompile_limit_is_the_chunked_one(monkeypatch, recompile_limit_error):
    """Where dynamo refuses one more specialisation of the two-layer cost, the chunked loops and plain
    operations give the same values and gradients, with a warning that names them."""
    from setperm import pairwise as pairwise_mod
    from setperm.cost import _two_layer_cost, _two_layer_cost_grad

    compiled = pairwise_mod._compiled

    def refuse(*args):
        raise recompile_limit_error

    monkeypatch.setattr(pairwise_mod, "_compiled",
                        lambda fn: refuse if fn in (_two_layer_cost, _two_layer_cost_grad) else compiled(fn))
    x, w1, b1, w2, mask = _two_layer_inputs(2, True)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2)]
    with pytest.warns(RuntimeWarning, match="recompile limit was reached for the pairwise MLP with eq. 8 and 10"):
        got = pairwise_cost(*leaves[:3], [], leaves[3], mask, kernel="compiled")
        grads = torch.autograd.grad(got.pow(3).sum(), leaves)
    want = pairwise_cost(*leaves[:3], [], leaves[3], mask, kernel="chunked")
    assert torch.equal(got, want)
    for g, w in zip(grads, torch.autograd.grad(want.pow(3).sum(), leaves)):
        assert torch.equal(g, w)
