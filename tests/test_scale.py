"""Power-of-two scaling of sets (setperm/scale.py): exact for ordinary inputs, finite costs and
linear-assignment logits for huge finite ones."""
import pytest
import torch
from torch.testing import assert_close

from setperm import PairwiseCost
from setperm.functional import pairwise_cost
from setperm.assign import linear_assignment_logits
from setperm.cost import normalize_cost
from setperm.scale import set_scale


def test_scale_is_a_power_of_two_bringing_sets_below_two():
    x = torch.tensor([[[0.5]], [[1.9]], [[-3.0]], [[1e38]], [[0.0]], [[3.4e38]]])
    s = set_scale(x)
    assert s.tolist()[:3] == [1.0, 1.0, 2.0] and s[4] == 1.0
    m, _ = torch.frexp(s)
    assert (m == 0.5).all()                                        # powers of two
    assert ((x.abs().flatten(1).amax(1) / s) < 2).all()
    assert set_scale(torch.zeros(3, 0, 4)).tolist() == [1.0, 1.0, 1.0]
    assert set_scale(torch.full((1, 2, 2), 6e4, dtype=torch.float16)).isfinite().all()   # 2^15 < float16 max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scale_is_frexps_exponent_for_every_magnitude(dtype):
    """s = 2^max(e - 1, 0) with max |x| = m 2^e (frexp, m in [0.5, 1)) over the dtype's whole range,
    subnormal and zero maxima (s = 1), and s = 1 for a set with an inf or a NaN (as if unscaled)."""
    info = torch.finfo(dtype)
    top = float(torch.tensor(info.max, dtype=torch.float64).log10())
    low = float(torch.tensor(info.smallest_normal, dtype=torch.float64).log10()) - 5
    mags = torch.cat([torch.logspace(low, top, 3000, dtype=torch.float64),
                      torch.tensor([0.0, 0.5, 1.0, 1.999, 2.0, 3.0, 4.0, info.max, info.tiny, info.tiny / 2],
                                   dtype=torch.float64)]).to(dtype)
    x = torch.zeros(len(mags) + 2, 3, 2, dtype=dtype)
    x[:len(mags), 1, 0] = mags * torch.tensor([1.0, -1.0], dtype=dtype).repeat(len(mags))[:len(mags)]
    x[-2, 0, 1], x[-1, 2, 0] = float("inf"), float("nan")
    amax = x.abs().flatten(1).amax(1).to(torch.promote_types(dtype, torch.float32))
    exponent = torch.frexp(amax).exponent
    want = torch.where(amax.isfinite(), torch.ldexp(torch.ones_like(amax), (exponent - 1).clamp_min(0).to(amax.dtype)),
                       1.0).to(dtype)
    got = set_scale(x)
    assert got.dtype == dtype and torch.equal(got, want)


def test_float64_scale_beyond_the_float32_range():
    """A float64 set's scale follows its own magnitude past float32's range (1e300, not capped)."""
    x = torch.tensor([[[1e300]], [[-1e50]], [[3e38]], [[1.5]]], dtype=torch.float64)
    s = set_scale(x)
    m, _ = torch.frexp(s)
    assert (m == 0.5).all() and torch.isfinite(s).all()
    ratio = x.abs().flatten(1).amax(1) / s
    assert ((ratio >= 1) | (s == 1)).all() and (ratio < 2).all()
    # hence eq. 6's logits of a huge float64 set are finite where the plain product would give NaN
    w = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    huge = torch.tensor([[[1e308, -1e308]]], dtype=torch.float64)
    assert torch.isnan(huge @ w.t()).all()
    assert_close(linear_assignment_logits(huge, w), torch.zeros(1, 1, 1, dtype=torch.float64), rtol=0, atol=0)


def literal_cost(module, x):
    """Eq. 8-10 with concatenated pairs in float64, no scaling."""
    B, N, D = x.shape
    xi, xj = x.unsqueeze(2).expand(B, N, N, D), x.unsqueeze(1).expand(B, N, N, D)
    C = (module.pair_scores(xi, xj) - module.pair_scores(xj, xi)).movedim(-1, 1)
    return C / C.pow(2).sum((-2, -1), keepdim=True).sqrt()


@pytest.mark.parametrize("hidden", [8, (6, 5)])
def test_scaled_cost_equals_the_literal_cost(hidden):
    """Sets with max |x| from 0.5 to 1e30 (scales 1 to 2^99) give eq. 8-10 exactly (float64)."""
    torch.manual_seed(0)
    m = PairwiseCost(3, hidden, channels=2).double()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64) * torch.tensor([0.2, 30.0, 1e6, 1e30],
                                                                                dtype=torch.float64)[:, None, None]
    assert_close(m(x), literal_cost(m, x), rtol=1e-10, atol=1e-12)
    # per set: neighbours do not matter (to rounding: BLAS may take another path for another batch shape)
    assert_close(m(x[:1]), m(x)[:1], rtol=1e-12, atol=1e-14)


def test_huge_float32_sets_give_a_finite_unit_norm_cost():
    torch.manual_seed(2)
    m = PairwiseCost(4, 16)
    x = 3.4e38 * torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3)).sign()
    x[1, :, 1:] = 1e38
    C = m(x)
    assert torch.isfinite(C).all()
    assert_close(C, -C.transpose(-1, -2), rtol=0, atol=0)
    assert_close(C.pow(2).sum((-2, -1)), torch.ones(2, 1), rtol=1e-5, atol=1e-6)
    # the same computation in float64, where nothing overflows
    assert_close(C.double(), literal_cost(m.double(), x.double()), rtol=0, atol=1e-5)


def test_unnormalised_cost_is_scaled_back():
    torch.manual_seed(4)
    m = PairwiseCost(2, 8, normalize=False).double()
    x = torch.randn(1, 4, 2, dtype=torch.float64) * 1e3
    C = pairwise_cost(x, m.first.weight, m.first.bias, [], m.last.weight, normalize=False)
    g = m.pair_scores(x.unsqueeze(2).expand(1, 4, 4, 2), x.unsqueeze(1).expand(1, 4, 4, 2)).movedim(-1, 1)
    assert_close(C, g - g.transpose(-1, -2), rtol=1e-12, atol=1e-9)


def test_normalize_cost_does_not_overflow():
    C = torch.tensor([[[[0.0, 3e38], [-3e38, 0.0]]]])
    out = normalize_cost(C)
    assert_close(out, torch.tensor([[[[0.0, 2 ** -0.5], [-(2 ** -0.5), 0.0]]]]), rtol=1e-6, atol=0)
    zero = torch.zeros(1, 1, 3, 3, requires_grad=True)
    out = normalize_cost(zero)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(zero.grad).all()
    tiny = torch.tensor([[[[0.0, 1e-20], [-1e-20, 0.0]]]], dtype=torch.float64)
    assert_close(normalize_cost(tiny), tiny / 1e-12, rtol=1e-12, atol=0)      # norm clamped at eps as before


def test_linear_assignment_logits_are_finite_or_infinite_never_nan():
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    x = torch.tensor([[[3e38, 3e38], [3e38, -3e38]]])
    logits = linear_assignment_logits(x, w)
    assert not torch.isnan(logits).any()
    assert logits[0, 0, 0] == float("inf") and logits[0, 0, 1] == 0.0
    y = torch.randn(2, 2, 2, dtype=torch.float64) * 100
    assert_close(linear_assignment_logits(y, w.double()), y @ w.double().t(), rtol=0, atol=0)


def test_linear_assignment_logits_rows_do_not_depend_on_other_elements():
    """A huge (padded, not zeroed) element leaves the other rows' logits as they are alone."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 3, generator=g)
    x = torch.randn(1, 4, 3, generator=g) * 1e-3
    padded = x.clone()
    padded[0, 3] = 3e38
    assert_close(linear_assignment_logits(padded, w)[0, :3], linear_assignment_logits(x, w)[0, :3],
                 rtol=1e-6, atol=0)
    assert_close(linear_assignment_logits(x, w), x @ w.t(), rtol=0, atol=0)


def test_gradcheck_through_the_scaled_cost():
    """Scale s = 2^10 (|x| ~ 1e3): gradients to the elements and to the first-layer bias (which is
    divided by s) are exact; two further ReLU layers with biases included."""
    torch.manual_seed(5)
    m = PairwiseCost(2, (6, 5)).double()
    for p in m.parameters():
        torch.nn.init.normal_(p)
    x = (torch.randn(2, 4, 2, dtype=torch.float64) * 1e3).requires_grad_(True)
    assert (set_scale(x) == 2.0 ** 10).all()
    mask = torch.tensor([[True, True, False, True], [True] * 4])
    assert torch.autograd.gradcheck(lambda x: m(x, mask), (x,))
    bias = m.hidden[0].bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda b: torch.func.functional_call(m, {"hidden.0.bias": b}, (x.detach(),), {"mask": mask}), (bias,))
