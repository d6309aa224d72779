import pytest
import torch
from torch.testing import assert_close

from setperm.functional import sinkhorn
from setperm.sinkhorn import sinkhorn_scaling_in_range


def random_mask(B, N, g, min_real=0):
    n = torch.randint(min_real, N + 1, (B,), generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[: n[b]]] = True
    return mask


def test_doubly_stochastic_unmasked():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 9, generator=g, dtype=torch.float64) * 3
    P = sinkhorn(logits, iters=200)
    assert_close(P.sum(1), torch.ones(4, 9, dtype=torch.float64), rtol=0, atol=1e-12)  # columns exact
    assert_close(P.sum(2), torch.ones(4, 9, dtype=torch.float64), rtol=0, atol=1e-8)   # rows converge
    assert (P >= 0).all()


def test_few_iterations_columns_exact():
    g = torch.Generator().manual_seed(1)
    P = sinkhorn(torch.randn(3, 6, 6, generator=g), iters=4)
    assert_close(P.sum(1), torch.ones(3, 6), rtol=0, atol=1e-5)


def test_masked_real_block_doubly_stochastic_and_padding_trailing():
    g = torch.Generator().manual_seed(2)
    B, N = 6, 10
    mask = random_mask(B, N, g)
    logits = torch.randn(B, N, N, generator=g, dtype=torch.float64)
    P = sinkhorn(logits, mask=mask, iters=300)
    for b in range(B):
        real = mask[b].nonzero().flatten()
        pads = (~mask[b]).nonzero().flatten()
        n = len(real)
        block = P[b][real][:, :n]
        if n:
            assert_close(block.sum(0), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
            assert_close(block.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-8)
        assert (P[b][real][:, n:] == 0).all()
        # the j-th padded element sits one-hot at position n + j
        expected = torch.zeros(len(pads), N, dtype=torch.float64)
        expected[torch.arange(len(pads)), n + torch.arange(len(pads))] = 1
        assert_close(P[b][pads], expected, rtol=0, atol=0)


def test_masked_equals_unpadded():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5, 5, generator=g, dtype=torch.float64)
    padded = torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 2, 3, 6, 7])
    padded[0, rows.unsqueeze(1), torch.arange(5).unsqueeze(0)] = logits[0]
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, rows] = True
    assert_close(sinkhorn(padded, mask=mask)[0, rows][:, :5], sinkhorn(logits)[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["auto", "scaling", "log"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_padding_does_not_leak(method, fill):
    """Padded rows and columns may hold anything: the real block and its gradient equal those of
    the set alone, and each padded element is exactly one-hot at its fixed position."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 5, 5, generator=g, dtype=torch.float64)
    rows = torch.tensor([0, 2, 3, 6, 7])
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, rows] = True
    padded = torch.full((1, 8, 8), fill, dtype=torch.float64)
    padded[0, rows.unsqueeze(1), torch.arange(5).unsqueeze(0)] = logits[0]
    padded.requires_grad_(True)
    alone = logits.clone().requires_grad_(True)
    P, ref = sinkhorn(padded, mask=mask, method=method), sinkhorn(alone, method=method)
    assert_close(P[0, rows][:, :5], ref[0], rtol=0, atol=1e-14)
    assert_close(P[0, [1, 4, 5], 5:], torch.eye(3, dtype=torch.float64), rtol=0, atol=0)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64)
    (P[0, rows][:, :5] * w).sum().backward()
    (ref[0] * w).sum().backward()
    assert_close(padded.grad[0, rows][:, :5], alone.grad[0], rtol=0, atol=1e-14)
    assert torch.isfinite(padded.grad).all()


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_large_logits_finite_float32(scale):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 7, 7, generator=g) * scale
    P = sinkhorn(logits, iters=10)
    assert torch.isfinite(P).all()
    assert_close(P.sum(1), torch.ones(2, 7), rtol=0, atol=1e-4)


def test_all_padding_and_temperature():
    P = sinkhorn(torch.zeros(2, 4, 4), mask=torch.zeros(2, 4, dtype=torch.bool))
    assert_close(P, torch.eye(4).expand(2, 4, 4), rtol=0, atol=0)
    sharp = sinkhorn(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), temperature=0.01)
    assert_close(sharp, torch.eye(2).unsqueeze(0), rtol=0, atol=1e-6)


def test_half_inputs_computed_in_float32():
    logits = torch.randn(2, 5, 5).to(torch.bfloat16) * 100
    P = sinkhorn(logits)
    assert P.dtype == torch.bfloat16 and torch.isfinite(P.float()).all()


def test_gradcheck():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [True] * 4])
    assert torch.autograd.gradcheck(lambda z: sinkhorn(z, mask=mask, iters=3), (logits,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="logits"):
        sinkhorn(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn(torch.zeros(1, 3, 3), temperature=0)


@pytest.mark.parametrize("scale", [0.1, 3.0, 20.0])
@pytest.mark.parametrize("masked", [False, True])
def test_scaling_and_log_methods_agree(scale, masked):
    """method="scaling" (matrix scalings) and method="log" (log-domain iterates) are the same
    operator: values and gradients agree in float64, masked and unmasked."""
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(4, 7, 7, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    mask = random_mask(4, 7, g) if masked else None
    up = torch.randn(4, 7, 7, generator=g, dtype=torch.float64)
    assert sinkhorn_scaling_in_range(z, mask=mask, iters=4)
    out = {}
    for method in ("scaling", "log", "auto"):
        P = sinkhorn(z, mask=mask, iters=4, method=method)
        out[method] = (P.detach(), torch.autograd.grad((P * up).sum(), z)[0])
    assert_close(out["scaling"][0], out["log"][0], rtol=0, atol=1e-12)
    assert_close(out["scaling"][1], out["log"][1], rtol=0, atol=1e-12)
    # where the scalings apply, "auto" is exactly "scaling"
    assert torch.equal(out["auto"][0], out["scaling"][0]) and torch.equal(out["auto"][1], out["scaling"][1])


def test_wide_logit_range_falls_back_to_log_domain():
    z = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(8))
    z[:, :, 0] -= 200.0           # exp(-200) underflows in float32: column 0's sum vanishes
    assert not sinkhorn_scaling_in_range(z, iters=4)
    P = sinkhorn(z, iters=4)
    assert torch.equal(P, sinkhorn(z, iters=4, method="log"))     # "auto" fell back
    assert_close(P, sinkhorn(z.double(), iters=4).float(), rtol=0, atol=1e-5)
    assert_close(P.sum(1), torch.ones(2, 4), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="method='scaling'.*range"):
        sinkhorn(z, iters=4, method="scaling")


def test_method_argument_checked():
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'scaling', 'log'\)"):
        sinkhorn(torch.zeros(1, 3, 3), method="exact")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_logits_rejected(dtype):
    with pytest.raises(ValueError, match=f"floating-point.*{dtype}"):
        sinkhorn(torch.ones(1, 3, 3, dtype=dtype))


@pytest.mark.parametrize("shape", [(0, 4, 4), (3, 0, 0), (0, 0, 0)])
def test_empty_inputs(shape):
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    for method in ("auto", "scaling", "log"):
        P = sinkhorn(z, mask=mask, method=method)
        assert P.shape == shape and P.dtype == z.dtype
        P.sum().backward()
    assert z.grad.shape == shape
    assert sinkhorn_scaling_in_range(z)


@pytest.mark.parametrize("method", ["auto", "log"])
def test_finite_for_logits_at_the_dtype_limit(method):
    """Logit differences beyond float32's range (and +-inf) still give a finite, column-normalised P."""
    z = torch.tensor([[[3e38, -3e38, 0.0], [3e38, -3e38, 1.0], [-3.4e38, 3.4e38, float("inf")]]])
    for temperature in (1.0, 1e-3):          # 1e-3: z / temperature overflows before the clamp
        P = sinkhorn(z, iters=4, temperature=temperature, method=method)
        assert torch.isfinite(P).all()
        assert_close(P.sum(1), torch.ones(1, 3), rtol=0, atol=1e-6)
    # below half the dtype's range nothing is clamped: eq. 11-12 written out, wide logits included
    g = torch.Generator().manual_seed(9)
    y = torch.randn(2, 5, 5, generator=g, dtype=torch.float64) * 1e3
    literal = y
    for _ in range(4):
        literal = literal - torch.logsumexp(literal, dim=2, keepdim=True)
        literal = literal - torch.logsumexp(literal, dim=1, keepdim=True)
    assert_close(sinkhorn(y, iters=4, method=method), literal.exp(), rtol=0, atol=1e-12)


def test_gradgradcheck():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [True] * 4])
    assert torch.autograd.gradgradcheck(lambda z: sinkhorn(z, mask=mask, iters=3), (logits,))


@pytest.mark.parametrize("method", ["scaling", "log"])
def test_torch_func_transforms_give_the_autograd_gradients(method):
    """torch.func.vjp / grad differentiate sinkhorn (setperm.fused recomputes gradients with vjp
    inside a compiled graph's operator, where torch.autograd.grad cannot record)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = random_mask(3, 6, g, min_real=1)
    weights = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)

    def loss(z):
        return (sinkhorn(z, mask=mask, iters=3, method=method) * weights).sum()
    expected, = torch.autograd.grad(loss(logits), logits)
    assert_close(torch.func.grad(loss)(logits.detach()), expected, rtol=1e-12, atol=1e-12)
    P, vjp = torch.func.vjp(lambda z: sinkhorn(z, mask=mask, iters=3, method=method), logits.detach())
    assert_close(vjp(weights)[0], expected, rtol=1e-12, atol=1e-12)
