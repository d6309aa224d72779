import re

import pytest
import torch
from torch.testing import assert_close

from setperm.functional import apply_permutation, hungarian, permutation_matrix, sinkhorn


def test_permutation_convention():
    # P[b, i, k] = weight of element i at position k; y = P^T x; hungarian idx[b, k] = element at k
    x = torch.tensor([[[10.0], [20.0], [30.0]]])
    P = torch.zeros(1, 3, 3)
    P[0, 2, 0] = 1    # element 2 -> position 0
    P[0, 0, 1] = 1    # element 0 -> position 1
    P[0, 1, 2] = 1    # element 1 -> position 2
    assert_close(apply_permutation(x, P), torch.tensor([[[30.0], [10.0], [20.0]]]))
    idx = hungarian(P)
    assert idx.tolist() == [[2, 0, 1]]
    assert_close(x[0, idx[0]], apply_permutation(x, P)[0])
    assert_close(permutation_matrix(idx), P)


def test_hungarian_recovers_known_permutation_and_is_a_permutation():
    g = torch.Generator().manual_seed(0)
    B, N = 5, 12
    perms = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    hard = permutation_matrix(perms, dtype=torch.float64)
    noisy = sinkhorn(torch.log(hard * 0.9 + 0.1 / N) + 0.1 * torch.randn(B, N, N, generator=g, dtype=torch.float64))
    idx, mat = hungarian(noisy, return_matrix=True)
    assert torch.equal(idx, perms)
    assert_close(mat, hard, rtol=0, atol=0)
    assert (mat.sum(1) == 1).all() and (mat.sum(2) == 1).all()


def test_hungarian_masked_keeps_padding_trailing():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, False, True, True, False]])
    P = sinkhorn(torch.randn(1, 5, 5, generator=g), mask=mask)
    idx = hungarian(P, mask=mask)
    assert sorted(idx[0, :3].tolist()) == [0, 2, 3]
    assert idx[0, 3:].tolist() == [1, 4]


def test_apply_trailing_dims_and_gradient():
    g = torch.Generator().manual_seed(2)
    tiles = torch.randn(2, 4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    P = sinkhorn(torch.randn(2, 4, 4, generator=g, dtype=torch.float64))
    y = apply_permutation(tiles, P)
    ref = torch.einsum("bik,bichw->bkchw", P, tiles)
    assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: apply_permutation(t, P), (tiles,))


def test_bad_shapes():
    with pytest.raises(ValueError, match="P must have shape"):
        apply_permutation(torch.zeros(2, 3, 1), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="P must have shape"):
        hungarian(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mask"):
        hungarian(torch.zeros(1, 3, 3), mask=torch.ones(1, 3))


@pytest.mark.parametrize("B,N", [(0, 4), (3, 0), (0, 0)])
def test_empty_batches_and_sets(B, N):
    x = torch.randn(B, N, 2, 3, dtype=torch.float64, requires_grad=True)
    P = torch.zeros(B, N, N, dtype=torch.float64, requires_grad=True)
    y = apply_permutation(x, P)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and P.grad.shape == P.shape
    mask = torch.zeros(B, N, dtype=torch.bool)
    idx, hard = hungarian(P, mask=mask, return_matrix=True)
    assert idx.shape == (B, N) and hard.shape == (B, N, N)
    assert permutation_matrix(idx).shape == (B, N, N)


def test_permutation_matrix_checks_idx():
    with pytest.raises(ValueError, match=r"idx must be an integer tensor of shape \(B, N\), got torch.float32"):
        permutation_matrix(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        permutation_matrix(torch.zeros(3, dtype=torch.long))
    for row in ([0, 0, 2], [0, 1, 3], [-1, 1, 2]):      # repeated, too large, negative: not a permutation
        with pytest.raises(ValueError, match="permutation of 0..2 in each row, row 1 is " + re.escape(str(row))):
            permutation_matrix(torch.tensor([[2, 0, 1], row], dtype=torch.int32))
    assert permutation_matrix(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 3)
    assert permutation_matrix(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 0)


def test_bad_arguments_are_named():
    """Each bad argument raises a ValueError naming it, not an error from deep inside torch or
    scipy (or, for a meta P times a CPU x, uninitialised memory)."""
    from setperm.assign import linear_assignment_logits

    P = sinkhorn(torch.randn(1, 3, 3))
    with pytest.raises(ValueError, match="P is on meta but x is on cpu"):
        apply_permutation(torch.randn(1, 3, 2), P.to("meta"))
    w = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
        linear_assignment_logits(torch.randn(3, 2), w)
    with pytest.raises(ValueError, match="x must have 2 features"):
        linear_assignment_logits(torch.randn(1, 3, 4), w)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        linear_assignment_logits(torch.ones(1, 3, 2, dtype=torch.long), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(M, D\)"):
        linear_assignment_logits(torch.randn(1, 3, 2), w[0])
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        linear_assignment_logits(torch.randn(1, 3, 2), w.to("meta"))
    with pytest.raises(ValueError, match="P must be a real tensor"):
        hungarian(torch.randn(1, 2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="P is on the meta device"):
        hungarian(torch.randn(1, 2, 2, device="meta"))


def test_integer_elements_are_averaged_in_p_s_dtype():
    """A soft P applied to integer (or bool) elements weighs them in P's floating dtype, not with P
    cast to integers (which would zero every weight below 1)."""
    x = torch.tensor([[[1], [3]]])
    P = torch.full((1, 2, 2), 0.5, dtype=torch.float64)
    y = apply_permutation(x, P)
    assert y.dtype == torch.float64
    assert_close(y, torch.full((1, 2, 1), 2.0, dtype=torch.float64))
    hard = permutation_matrix(torch.tensor([[1, 0]]))
    assert_close(apply_permutation(x, hard), torch.tensor([[[3.0], [1.0]]]))
    assert apply_permutation(x.bool(), hard).dtype == torch.float32
