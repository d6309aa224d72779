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


def test_identical_elements_zero_cost_finite_gradient():
    m = PairwiseCost(3, 8)
    x = torch.ones(2, 5, 3, requires_grad=True)
    C = m(x)
    assert (C == 0).all()
    C.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(p.grad is not None for p in m.parameters())  # every parameter is used (DDP)


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
