"""One padding convention, three spellings: ``mask`` (True = real), ``lengths`` (prefix) and
``key_padding_mask`` (True = padding, as nn.MultiheadAttention) on every public entry point."""
import pytest
import torch
from torch.testing import assert_close

from setperm import LinAssign, PairwiseCost, PermutationOptimization, PermutationSetEncoder
from setperm.functional import hungarian, optimize_permutation, pairwise_cost, permutation_entropy, sinkhorn
from setperm.sinkhorn import sinkhorn_scaling_in_range
from setperm.masking import check_dtype, check_finite, resolve_mask

B, N, D = 3, 6, 4
LENGTHS = torch.tensor([6, 3, 0])
MASK = torch.arange(N) < LENGTHS[:, None]          # prefix padding, so all three spellings apply


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    z = torch.randn(B, N, N, generator=g, dtype=torch.float64)
    return x, z


def _modules():
    torch.manual_seed(0)
    return {"encoder": PermutationSetEncoder(D, 5, PermutationOptimization(D, cost_hidden=6, steps=3)).double(),
            "po-u": PermutationOptimization(D, cost_hidden=6, steps=2).double(),
            "po-la": PermutationOptimization(D, cost_hidden=6, steps=2, permutation="po-la", num_positions=N).double(),
            "linassign": LinAssign(D, num_positions=N).double(),
            "cost": PairwiseCost(D, 6).double()}


def entry_points():
    """(name, call(padding kwargs) -> tensor) for every public function or module taking a mask."""
    x, z = _inputs()
    mods = _modules()
    cost = mods["cost"]
    C = cost(x, MASK).detach()
    calls = {f"{k}.forward": (lambda kw, m=m: m(x, **kw)) for k, m in mods.items()}
    calls.update({
        "pairwise_cost": lambda kw: pairwise_cost(torch.where(MASK[..., None], x, 0.0), cost.first.weight,
                                                  cost.first.bias, [], cost.last.weight, **kw),
        "sinkhorn": lambda kw: sinkhorn(z, **kw),
        "sinkhorn_scaling_in_range": lambda kw: torch.tensor(sinkhorn_scaling_in_range(z, **kw)),
        "hungarian": lambda kw: hungarian(sinkhorn(z, mask=MASK), **kw),
        "optimize_permutation": lambda kw: optimize_permutation(C, steps=2, **kw),
        "permutation_entropy": lambda kw: permutation_entropy(sinkhorn(z, mask=MASK), **kw),
    })
    return calls


CALLS = entry_points()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_key_padding_mask_and_lengths_equal_mask(name):
    call = CALLS[name]
    ref = call({"mask": MASK})
    assert_close(call({"key_padding_mask": ~MASK}), ref, rtol=0, atol=0)
    assert_close(call({"lengths": LENGTHS}), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_two_paddings_are_an_error(name):
    call = CALLS[name]
    for kw in ({"mask": MASK, "lengths": LENGTHS}, {"mask": MASK, "key_padding_mask": ~MASK},
               {"lengths": LENGTHS, "key_padding_mask": ~MASK}):
        with pytest.raises(ValueError, match="at most one of mask / lengths / key_padding_mask"):
            call(kw)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_padding_on_the_meta_device_is_named(name):
    # a mask on another device is moved to the input's; meta holds no values to move or to read
    # set sizes from, which torch reports without naming the argument
    call = CALLS[name]
    with pytest.raises(ValueError, match="mask is on meta but .* is on cpu"):
        call({"mask": MASK.to("meta")})
    with pytest.raises(ValueError, match="key_padding_mask is on meta but .* is on cpu"):
        call({"key_padding_mask": (~MASK).to("meta")})
    with pytest.raises(ValueError, match="lengths is on the meta device"):
        call({"lengths": LENGTHS.to("meta")})


def test_resolve_mask_checks_each_spelling():
    x = torch.zeros(B, N, D)
    assert resolve_mask(x) is None
    assert torch.equal(resolve_mask(x, key_padding_mask=~MASK), MASK)
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor \(True = padding\), got dtype torch.float32"):
        resolve_mask(x, key_padding_mask=torch.zeros(B, N))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\) = \(3, 6\) to match x \(3, 6, 4\)"):
        resolve_mask(x, key_padding_mask=torch.zeros(B, N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \(True = real element\)"):
        resolve_mask(x, mask=torch.ones(B, N, dtype=torch.uint8))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        resolve_mask(x, lengths=torch.ones(B))
    for bad in ("abc", [1, "a", 2], [[1], [2, 3]]):          # not convertible to a tensor at all
        with pytest.raises(ValueError, match="lengths must be an integer tensor"):
            resolve_mask(x, lengths=bad)
    # sinkhorn names its own argument
    with pytest.raises(ValueError, match=r"to match logits \(3, 6, 6\)"):
        sinkhorn(torch.zeros(B, N, N), key_padding_mask=torch.zeros(B, 2, dtype=torch.bool))


def test_check_dtype_rules():
    check_dtype(torch.zeros(1), None)                   # a module without parameters takes anything
    check_dtype(torch.zeros(1, dtype=torch.float64), torch.float64)
    with pytest.raises(ValueError, match="x has dtype torch.float16 but the module's parameters are torch.float32"):
        check_dtype(torch.zeros(1, dtype=torch.float16), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_dtype(torch.zeros(1, dtype=torch.float16), torch.float32)
        check_dtype(torch.zeros(1, dtype=torch.float32), torch.bfloat16)
        with pytest.raises(ValueError, match="float64"):
            check_dtype(torch.zeros(1, dtype=torch.float64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_finds_every_non_finite_real_element(dtype, bad):
    """The check refuses a NaN or an infinity at a real element wherever it lies (any feature, any set, any
    dtype), names its index, and ignores one at a padded element; a finite or empty input passes."""
    x = torch.randn(B, N, D).to(dtype)
    check_finite(x, MASK)
    check_finite(x, None)
    check_finite(x[:, :0], MASK[:, :0])
    for b, n, d in [(0, 0, 0), (0, 5, 3), (1, 2, 1)]:                         # real elements
        y = x.clone()
        y[b, n, d] = bad
        with pytest.raises(ValueError, match=rf"x has a non-finite value .*index \({b}, {n}, {d}\)"):
            check_finite(y, MASK)
        with pytest.raises(ValueError, match="non-finite"):
            check_finite(y, None)
        with pytest.raises(ValueError, match="non-finite"):
            check_finite(y[..., 0] if d == 0 else y[..., d], MASK)           # (B, N) inputs too
    y = x.clone()
    y[1, 4] = bad                                                             # padding (set 1 has 3)
    y[2, :, 1] = bad                                                          # an empty set
    check_finite(y, MASK)
    with pytest.raises(ValueError, match="non-finite"):
        check_finite(y, None)
