"""setperm.fused: the permutation optimisation as Triton kernels equals the unrolled steps.

On CUDA the kernels run compiled; on the CPU in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1`` before Triton is imported where there is no CUDA). Without Triton the
module is skipped, except the tests of what happens without it.
"""
import importlib
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from setperm import PermutationOptimization, PermutationSetEncoder
from setperm.functional import optimize_permutation

fused = importlib.import_module("setperm.fused")
HAS_TRITON = fused.unavailable() is None


def cost(B, N, seed, mask=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(B, N, N, generator=g, dtype=dtype)
    C = C - C.transpose(1, 2)
    if mask is not None:
        C = C * (mask[:, :, None] & mask[:, None, :])
    return C / C.norm(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def random_mask(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=g) > 0.35
    mask[0] = False                                   # an empty set
    mask[-1] = True                                   # a full one
    return mask


def run(C, init, mask, eta, kernel, device, fn=None, **kw):
    """P and the gradients of <P, G> with respect to C, eta (and init) for one kernel, float32 for
    "fused" (the kernels compute in float32), the given dtype otherwise. ``fn(C, init, mask, eta)``:
    the optimisation to call instead (a compiled one)."""
    dtype = torch.float32 if kernel == "fused" else C.dtype
    leaves = [C.to(device, dtype).requires_grad_(True),
              torch.tensor(eta, dtype=dtype, device=device).requires_grad_(True)]
    if init is not None:
        leaves.append(init.to(device, dtype).requires_grad_(True))
    m = None if mask is None else mask.to(device)
    init_leaf = leaves[2] if init is not None else None
    P = (fn(leaves[0], init_leaf, m, leaves[1]) if fn is not None
         else optimize_permutation(leaves[0], init_leaf, m, eta=leaves[1], kernel=kernel, **kw))
    G = torch.randn(P.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad((P * G).sum(), leaves)
    return P, grads


CASES = [  # B, N, steps, sinkhorn_iters, temperature, masked, init
    (3, 5, 3, 4, 1.0, False, False),
    (4, 17, 3, 4, 1.0, True, False),          # N not a power of two, padded sets, an empty set
    (2, 20, 2, 3, 0.5, True, True),           # PO-LA start, temperature
    (3, 8, 1, 0, 1.0, True, True),            # no Sinkhorn rounds: P = exp(P~)
    (2, 1, 2, 4, 1.0, False, False),          # one element
    (2, 33, 4, 4, 1.0, True, False),          # a 64-wide tile
    (3, 100, 3, 4, 1.0, True, False),         # the VQA configuration (10-100 boxes): a 128-wide tile
    (2, 64, 2, 4, 1.0, True, True),           # full tiles: no lane past N
    (2, 128, 2, 3, 1.0, True, False),         # the largest set the kernels take
]


@pytest.mark.parametrize("B,N,steps,iters,temperature,masked,with_init", CASES)
def test_fused_equals_the_unrolled_steps_in_values_and_gradients(fdevice, B, N, steps, iters, temperature, masked,
                                                                 with_init):
    mask = random_mask(B, N, seed=N) if masked else None
    C = cost(B, N, seed=N, mask=mask)
    init = torch.randn(B, N, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64) if with_init else None
    kw = dict(steps=steps, sinkhorn_iters=iters, temperature=temperature)
    ref, ref_grads = run(C, init, mask, 0.7, "chunked", "cpu", **kw)           # float64 on the CPU
    P, grads = run(C, init, mask, 0.7, "fused", fdevice, **kw)
    assert P.grad_fn is not None and "Fused" in P.grad_fn.name()             # the kernels ran
    assert P.dtype == torch.float32 and torch.isfinite(P).all()
    assert_close(P.double().cpu(), ref, rtol=1e-5, atol=2e-6)
    # float32 against float64: the unrolled float32 path is off by up to ~1e-5 here too (eta's
    # gradient is a sum with cancellation)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        err = (got.double().cpu() - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 1e-4, err


@pytest.mark.parametrize("B,N,with_init", [(4, 17, False), (3, 100, True), (2, 128, False)])
def test_the_cost_read_in_place_equals_the_cost_staged(fdevice, B, N, with_init):
    """stage_c=True (the default: C copied into a zero-padded scratch tile, read without masks) and
    False (C read where it is) are the same products: the same values and gradients."""
    from setperm import fused

    mask = random_mask(B, N, seed=N)
    C = cost(B, N, seed=N, mask=mask).float().to(fdevice)
    init = (torch.randn(B, N, N, generator=torch.Generator().manual_seed(1)).to(fdevice) if with_init else None)
    G = torch.randn(B, N, N, generator=torch.Generator().manual_seed(7)).to(fdevice)
    results = []
    for stage_c in (True, False):
        leaves = [C.clone().requires_grad_(True)] + ([init.clone().requires_grad_(True)] if with_init else [])
        P = fused.fused_optimize(leaves[0], leaves[1] if with_init else None, mask.to(fdevice), steps=3,
                                 sinkhorn_iters=4, temperature=1.0, stage_c=stage_c)
        results.append((P, torch.autograd.grad((P * G).sum(), leaves)))
    (P_staged, g_staged), (P_in_place, g_in_place) = results
    assert_close(P_in_place, P_staged, rtol=1e-6, atol=1e-7)
    for got, want in zip(g_in_place, g_staged):
        assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_init", [False, True])
def test_forward_keeps_the_first_logits_only_where_they_are_not_zeros(fdevice, with_init):
    """PO-U starts from zeros: backward takes them as such, and forward keeps the T later steps'
    logits (with a start, PO-LA's, all T + 1); the gradients are checked against the unrolled steps
    by the tests above, with and without a start."""
    from setperm import fused

    B, N, steps = 2, 6, 3
    C = cost(B, N, seed=4).float().to(fdevice).requires_grad_(True)
    init = torch.randn(B, N, N, generator=torch.Generator().manual_seed(5)).to(fdevice) if with_init else None
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        fused.fused_optimize(C, init, None, steps=steps, sinkhorn_iters=2, temperature=1.0)
    assert (B, steps + with_init, N, N) in shapes and (B, steps + 1 - with_init, N, N) not in shapes


def test_stage_c_is_checked():
    from setperm import fused

    with pytest.raises(ValueError, match="stage_c must be True or False, got 1"):
        fused.fused_optimize(torch.zeros(1, 2, 2), None, None, steps=1, sinkhorn_iters=1, temperature=1.0, stage_c=1)


def test_per_set_tiles_equal_one_tile_and_the_unrolled_steps(fdevice, monkeypatch):
    """Sets padded to 100 whose spans (1 + the last real element's index) take each tile size, real
    elements after holes among them: computed each in its smallest tile (one launch per tile size),
    the values and gradients of every set in the 128-wide tile and of the unrolled steps in float64;
    past each span P is the identity and the gradients are zeros, exactly."""
    spans = [0, 5, 16, 17, 40, 64, 65, 100]
    N = 100
    mask = torch.arange(N) < torch.tensor(spans)[:, None]
    mask[3, 2] = mask[4, 10:20] = mask[7, :50] = False
    C = cost(len(spans), N, seed=8, mask=mask).float()
    init = torch.randn(len(spans), N, N, generator=torch.Generator().manual_seed(9))
    G = torch.randn(len(spans), N, N, generator=torch.Generator().manual_seed(10))
    launched = []
    real = fused._launch

    def launch(kernel, *args, **meta):
        launched.append((kernel.__name__, meta["BLOCK"]))
        return real(kernel, *args, **meta)
    monkeypatch.setattr(fused, "_launch", launch)

    def optimise(per_set_tiles):
        leaves = [t.to(fdevice).requires_grad_(True) for t in (C, init)]
        P = fused.fused_optimize(leaves[0], leaves[1], mask.to(fdevice), steps=3, sinkhorn_iters=4, temperature=1.0,
                                 per_set_tiles=per_set_tiles)
        return P.cpu(), [g.cpu() for g in torch.autograd.grad((P * G.to(fdevice)).sum(), leaves)]
    P, grads = optimise(True)
    assert launched == [(k, tile) for k in ("forward_kernel", "backward_kernel") for tile in (16, 32, 64, 128)]
    launched.clear()
    P_one, grads_one = optimise(False)
    assert launched == [("forward_kernel", 128), ("backward_kernel", 128)]
    assert_close(P, P_one, rtol=1e-5, atol=1e-6)
    for g, g_one in zip(grads, grads_one):
        assert_close(g, g_one, rtol=1e-4, atol=1e-5)
    # (eta = 0.5: optimize_permutation's step matrix 2 eta C is C)
    ref, _ = run(C.double(), init.double(), mask, 0.5, "chunked", "cpu", steps=3, sinkhorn_iters=4)
    assert_close(P.double(), ref, rtol=1e-4, atol=1e-5)
    for b, span in enumerate(spans):
        corner = torch.zeros(N, N, dtype=torch.bool)
        corner[:span, :span] = True
        assert torch.equal(P[b][~corner], torch.eye(N)[~corner]), span
        assert (grads[0][b][~corner] == 0).all() and (grads[1][b][~corner] == 0).all(), span


def test_per_set_tiles_is_checked():
    with pytest.raises(ValueError, match="per_set_tiles must be True or False, got 'yes'"):
        fused.fused_optimize(torch.zeros(1, 2, 2), None, None, steps=1, sinkhorn_iters=1, temperature=1.0,
                             per_set_tiles="yes")


def test_scratch_slots_are_bounded_by_the_programs_a_gpu_holds_not_by_the_sets(monkeypatch):
    """The kernels' scratch has a slot per program the GPU can hold at once (bounded by its
    multiprocessors, threads and registers), not one per set: for BAN's 2,048 sets of up to 100
    elements on a GPU of 132 multiprocessors, 24.75 MiB of backward's scratch instead of 384."""
    props = types.SimpleNamespace(multi_processor_count=132, max_threads_per_multi_processor=2048,
                                  regs_per_multiprocessor=65536)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    cuda = torch.device("cuda")
    # tile: warps -> programs per multiprocessor (threads, registers at 64 per thread)
    assert [fused._slots(cuda, 4096, block, fused._warps(block)) for block in (16, 32, 64, 128)] == [
        132 * 16, 132 * 8, 132 * 2, 132]
    assert fused._slots(cuda, 100, 128, 32) == 100 and fused._slots(cuda, 1, 16, 2) == 1   # at most one per set
    real = fused._slots
    monkeypatch.setattr(fused, "_slots", lambda device, *args: real(cuda, *args))     # (a meta tensor as the cost)
    C = torch.empty(2048, 100, 100, device="meta")
    scratch, flags, slots = fused._scratch(C, fused._tiles(100, per_set=True), 3, None)
    monkeypatch.setattr(fused, "_slots", real)
    assert scratch.numel() * 4 == 132 * 3 * 128 * 128 * 4 == 24.75 * 2 ** 20
    assert flags.shape == (2048,) and flags.dtype == torch.int32 and slots == {16: 2048, 32: 132 * 8, 64: 132 * 2, 128: 132}
    # without CUDA (Triton's interpreter runs one program at a time) a few slots, which programs share
    assert fused._slots(torch.device("cpu"), 2048, 128, 32) == fused.INTERPRETER_SLOTS


@pytest.mark.parametrize("fill", [0.0, float("nan")])
def test_padded_sets_equal_the_sets_alone(fdevice, fill):
    """Whatever the padding holds (zero, as PairwiseCost gives, or NaN), in the cost and in the start."""
    sizes = [6, 3, 1, 0]
    N = 7
    mask = torch.arange(N) < torch.tensor(sizes)[:, None]
    pairs = mask[:, :, None] & mask[:, None, :]
    C = cost(len(sizes), N, seed=3, mask=mask).float()
    init = torch.randn(len(sizes), N, N, generator=torch.Generator().manual_seed(4))
    Cp = torch.where(pairs, C, torch.tensor(fill))
    initp = torch.where(mask[:, :, None], init, torch.tensor(fill))
    P = optimize_permutation(Cp.to(fdevice), initp.to(fdevice), mask.to(fdevice), eta=1.0, steps=3,
                             kernel="fused").cpu()
    for b, n in enumerate(sizes):
        alone = optimize_permutation(C[b:b + 1, :n, :n].to(fdevice), init[b:b + 1, :n, :n].to(fdevice), eta=1.0,
                                     steps=3, kernel="fused").cpu()
        assert_close(P[b, :n, :n], alone[0], rtol=1e-5, atol=1e-6)
        assert_close(P[b, n:, n:], torch.eye(N - n))                          # the padding pinned in order
        assert (P[b, :n, n:] == 0).all() and (P[b, n:, :n] == 0).all()


@pytest.mark.parametrize("given", ["mask", "lengths"])
def test_the_encoder_with_the_fused_kernel_equals_chunked(fdevice, given):
    """A random mask on sets of 9 (one tile), or set sizes on sets padded to 40 whose spans take
    the tiles of 16, 32 and 64."""
    torch.manual_seed(0)
    enc = PermutationSetEncoder(5, 12, PermutationOptimization(5, cost_hidden=16, steps=3, kernel="chunked"))
    enc = enc.to(fdevice)
    g = torch.Generator().manual_seed(2)
    if given == "mask":
        x = torch.randn(4, 9, 5, generator=g).to(fdevice)
        sets = {"mask": (torch.rand(4, 9, generator=g) > 0.3).to(fdevice)}
    else:
        x = torch.randn(5, 40, 5, generator=g).to(fdevice)
        sets = {"lengths": torch.tensor([40, 33, 17, 9, 0]).to(fdevice)}
    outs, grads = [], []
    for kernel in ("chunked", "fused"):
        enc.po.cost.kernel = kernel
        out = enc(x, **sets)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), list(enc.parameters())))
    assert enc.po.kernel == "fused"
    assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7


def test_the_encoder_with_the_fused_kernel_is_invariant_to_the_order(fdevice):
    torch.manual_seed(0)
    enc = PermutationSetEncoder(3, 8, PermutationOptimization(3, cost_hidden=8, steps=2, kernel="fused")).to(fdevice)
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(4)).to(fdevice)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5)).to(fdevice)
    assert_close(enc(x[:, perm]), enc(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_init", [False, True])
def test_the_fused_optimisation_makes_the_host_wait_nowhere(fdevice, device_path, with_init):
    """conftest's ``HostWaits`` around the fused optimisation's forward and backward on the path
    CUDA takes: nothing but the kernels themselves, which Triton's interpreter runs by reading their
    arguments on the host (on CUDA, ``test_devices``' sync-debug test covers the launches too)."""
    if fdevice.type != "cpu":
        pytest.skip("on CUDA the sync-debug test of test_devices checks the same")
    mask = random_mask(3, 9, seed=2)
    C = cost(3, 9, seed=2, mask=mask).float().requires_grad_(True)
    init = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(3)).requires_grad_(True) if with_init else None
    with device_path(exempt=[(fused, "_launch")]) as waits:
        P = optimize_permutation(C, init, mask, eta=0.7, steps=2, kernel="fused")
        P.square().sum().backward()
    assert waits.calls == {"_launch": 2} and "Fused" in P.grad_fn.name()  # the kernels ran, forward and backward
    assert torch.isfinite(C.grad).all() and (init is None or torch.isfinite(init.grad).all())


def test_where_the_kernels_do_not_apply_the_unrolled_steps_run(fdevice):
    C = cost(2, 6, seed=0).float().to(fdevice)
    unrolled = optimize_permutation(C, eta=1.0, steps=2, kernel="chunked")
    steps = optimize_permutation(C, eta=1.0, steps=2, kernel="fused", return_steps=True)
    assert isinstance(steps, list) and len(steps) == 3
    assert_close(steps[-1], unrolled, rtol=1e-5, atol=1e-6)
    C64 = C.double().requires_grad_(True)                  # float64: the unrolled path, in float64
    P64 = optimize_permutation(C64, eta=1.0, steps=2, kernel="fused")
    assert P64.dtype == torch.float64 and "Fused" not in P64.grad_fn.name()
    big = fused.MAX_SET_SIZE + 1
    assert not fused.applies(torch.zeros(1, big, big, device=fdevice), steps=2)
    assert not fused.applies(torch.zeros(1, 4, 4, device=fdevice), steps=0)
    assert not fused.applies(torch.zeros(0, 4, 4, device=fdevice), steps=2)
    lattice = torch.stack([C, -C], dim=1)
    P = optimize_permutation(lattice[:, :, :4, :4], eta=1.0, steps=2, grid=(2, 2), kernel="fused")
    assert P.shape == (2, 4, 4)


def test_half_precision_costs_are_computed_in_float32(fdevice):
    C = cost(2, 6, seed=1).float()
    P32 = optimize_permutation(C.to(fdevice), eta=1.0, steps=2, kernel="fused")
    P16 = optimize_permutation(C.to(fdevice, torch.bfloat16), eta=1.0, steps=2, kernel="fused")
    assert P16.dtype == torch.bfloat16
    assert_close(P16.float(), P32, rtol=0, atol=2e-2)


def test_large_logits_keep_the_unrolled_paths_accuracy(fdevice):
    """Each Sinkhorn half-step is taken on the iterate, as the unrolled path takes it: a PO-LA start
    of logits in the thousands, or a low temperature, costs no accuracy (with the corrections summed
    into row and column potentials as large as the logits, later rounds were rounded away: errors
    of 1e-4 at 1e4)."""
    band = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= 1
    C = torch.zeros(2, 6, 6, dtype=torch.float64)      # the start alone (a cost step adds float32 rounding of M)
    for M in (1e2, 1e4, 1e5):
        init = torch.where(band, M, 0.0).double()[None].repeat(2, 1, 1)
        ref, _ = run(C, init, None, 0.7, "chunked", "cpu", steps=1, sinkhorn_iters=4)       # float64
        P, _ = run(C, init, None, 0.7, "fused", fdevice, steps=1, sinkhorn_iters=4)
        assert (P.double().cpu() - ref).abs().max() < 1e-6, M
    C = cost(3, 9, seed=5)
    init = 5 * torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = run(C, init, None, 1.0, "chunked", "cpu", steps=2, temperature=1e-3)
    P, _ = run(C, init, None, 1.0, "fused", fdevice, steps=2, temperature=1e-3)
    assert (P.double().cpu() - ref).abs().max() < 1e-6


@pytest.mark.parametrize("where", ["C", "init"])
def test_a_nan_gives_nan_as_on_the_unrolled_path(fdevice, where):
    """A NaN in a set's cost or start makes its P NaN (no clamp turns it into a finite P) and
    leaves the other sets alone."""
    C = cost(2, 5, seed=6).float()
    init = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(2))
    (C if where == "C" else init)[0, 1, 2] = float("nan")
    for kernel in ("chunked", "fused"):
        P = optimize_permutation(C.to(fdevice), init.to(fdevice), eta=0.7, steps=2, kernel=kernel).cpu()
        assert torch.isnan(P[0]).any() and torch.isfinite(P[1]).all(), kernel


def test_second_order_gradients_equal_the_unrolled_steps(fdevice):
    """A differentiated backward (create_graph=True, e.g. a gradient penalty) is recomputed through
    the unrolled steps: the same second-order gradients, not the kernels' first-order ones."""
    B, N = 2, 6
    C0, init0 = cost(B, N, seed=7).float(), torch.randn(B, N, N, generator=torch.Generator().manual_seed(3))
    result = {}
    for kernel in ("chunked", "fused"):
        C, init = C0.to(fdevice).requires_grad_(), init0.to(fdevice).requires_grad_()
        eta = torch.tensor(0.7, device=fdevice, requires_grad=True)
        P = optimize_permutation(C, init, eta=eta, steps=3, kernel=kernel)
        assert kernel == "chunked" or "Fused" in P.grad_fn.name()
        gC, g_init = torch.autograd.grad(P.square().sum(), (C, init), create_graph=True)
        result[kernel] = torch.autograd.grad(gC.square().sum() + g_init.square().sum(), (C, eta, init))
    for got, want in zip(result["fused"], result["chunked"]):
        assert ((got - want).norm() / want.norm()) < 1e-4


def test_torch_func_transforms_take_the_fused_optimisation(fdevice):
    """torch.func.grad through kernel="fused" gives the unrolled path's gradients (its backward
    runs differentiably there, through the unrolled steps)."""
    C, init = cost(2, 6, seed=8).float().to(fdevice), torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(4))
    init, G = init.to(fdevice), torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(5)).to(fdevice)

    def loss(kernel):
        return lambda C, init: (optimize_permutation(C, init, eta=0.7, steps=3, kernel=kernel) * G).sum()

    want = torch.func.grad(loss("chunked"), argnums=(0, 1))(C, init)
    got = torch.func.grad(loss("fused"), argnums=(0, 1))(C, init)
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("kernel", ["chunked", "fused"])
@pytest.mark.parametrize("name, value", [("temperature", 0.0), ("temperature", -1.0), ("temperature", float("nan")),
                                         ("sinkhorn_iters", -1), ("sinkhorn_iters", 2.0), ("sinkhorn_iters", True)])
def test_the_sinkhorn_arguments_are_checked_on_every_path(kernel, name, value):
    with pytest.raises(ValueError, match=name):
        optimize_permutation(cost(1, 4, seed=0).float(), eta=0.7, steps=2, kernel=kernel, **{name: value})


def test_kernel_argument_is_checked():
    with pytest.raises(ValueError, match="kernel must be one of"):
        optimize_permutation(torch.zeros(1, 3, 3), kernel="triton")


@pytest.fixture
def fresh_fallbacks(monkeypatch):
    """No fallback recorded or warned by earlier tests."""
    monkeypatch.setattr(fused, "_broken", {})
    monkeypatch.setattr(fused, "_warned", set())


def _falls_back_once_to_the_unrolled_values(C, init, reason):
    """kernel="fused" warns ``reason`` once and gives the unrolled steps' values and gradients."""
    with pytest.warns(RuntimeWarning, match=reason + ".*the unrolled steps compute the same values"):
        P, grads = run(C, init, None, 0.7, "fused", "cpu", steps=2)
    P_ref, grads_ref = run(C, init, None, 0.7, "chunked", "cpu", steps=2)
    assert_close(P, P_ref, rtol=0, atol=0)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # once: later calls say nothing
        run(C, init, None, 0.7, "fused", "cpu", steps=2)


def test_a_missing_triton_falls_back_once_with_the_reason(monkeypatch, fresh_fallbacks):
    monkeypatch.setattr(fused, "unavailable", lambda: "Triton is not installed")
    monkeypatch.setattr(fused, "applies", lambda C, steps: True)
    C = cost(2, 5, seed=0).float()
    _falls_back_once_to_the_unrolled_values(C, None, "kernel='fused' needs Triton.*Triton is not installed")
    with pytest.raises(RuntimeError, match="kernel='fused' needs Triton.*Triton is not installed"):
        fused.fused_optimize(C, None, None, steps=2, sinkhorn_iters=4, temperature=1.0)   # no fallback given


@pytest.mark.parametrize("version, refused", [("2.1.0", True), ("3.0.0", True), ("3.1.0", True), ("3.2.0", False),
                                             ("3.6.0+git1234", False), ("3.10.0", False), ("nightly", True)])
def test_triton_older_than_3_2_is_named(monkeypatch, version, refused):
    """torch 2.0 - 2.3 bring Triton 2.x, for which the kernels are not written; the compiler of 3.0
    and 3.1 (torch 2.4, 2.5) crashes the process on the backward kernel."""
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    fused.unavailable.cache_clear()
    try:
        reason = fused.unavailable()
    finally:
        fused.unavailable.cache_clear()
    assert (reason == f"Triton {version} is installed; the kernels need Triton 3.2 or newer") == refused
    assert refused or reason is None


class _Kernel:
    """A Triton kernel stand-in: fails like a kernel too large for the GPU, or counts its launches."""

    def __init__(self, name, works=None):
        self.__name__, self.works, self.launches = name, works, 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches += 1
            if self.works is None:
                raise ValueError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")
            return self.works[grid](*args, **meta)
        return launch


def test_the_kernels_are_launched_with_fma_contraction_named(fdevice, monkeypatch):
    """Triton contracts multiply-adds by default up to 3.9 and warns that 3.10 will not: the
    launches name it, so that neither the rounding nor the warning depends on the release."""
    launches = []

    class Recording:
        def __init__(self, kernel):
            self.kernel, self.__name__ = kernel, kernel.__name__

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append((self.__name__, meta.get("enable_fp_fusion")))
                return self.kernel[grid](*args, **meta)
            return launch

    real = fused._kernels()
    monkeypatch.setattr(fused, "_kernels", lambda: types.SimpleNamespace(
        forward_kernel=Recording(real.forward_kernel), backward_kernel=Recording(real.backward_kernel)))
    C = cost(2, 6, seed=2).float().to(fdevice).requires_grad_(True)
    P = fused.fused_optimize(C, None, None, steps=2, sinkhorn_iters=3, temperature=1.0)
    P.sum().backward()
    assert launches == [("forward_kernel", True), ("backward_kernel", True)]


@pytest.fixture
def failing_forward_kernel(monkeypatch, fresh_fallbacks):
    """Triton present and the kernels applying, but the forward kernel fails to build (a stand-in
    that counts its launches)."""
    class Kernels:
        forward_kernel = _Kernel("forward_kernel")

    monkeypatch.setattr(fused, "unavailable", lambda: None)
    monkeypatch.setattr(fused, "applies", lambda C, steps: True)
    monkeypatch.setattr(fused, "_kernels", lambda: Kernels)
    return Kernels


@pytest.mark.parametrize("with_init", [False, True])
def test_a_forward_kernel_triton_cannot_build_falls_back_once_with_the_reason(failing_forward_kernel, with_init):
    Kernels = failing_forward_kernel
    C = cost(2, 5, seed=0).float()
    init = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(3)) if with_init else None
    _falls_back_once_to_the_unrolled_values(C, init, "forward_kernel for sets padded to 16 .*out of resource")
    assert Kernels.forward_kernel.launches == 1                     # no second build
    fused._broken.clear()
    with pytest.raises(RuntimeError, match="forward_kernel for sets padded to 16 .*out of resource"):
        fused.fused_optimize(C, None, None, steps=2, sinkhorn_iters=4, temperature=1.0)   # no fallback given


@pytest.mark.usefixtures("failing_forward_kernel")
def test_the_fallback_computes_in_float32_whichever_call_found_the_kernel_missing():
    """A half-precision cost: the call whose kernel failed to build and the later calls, which fall
    back at once, compute in float32 as the kernels do (the same values), and the warning names the
    caller's line, not setperm's or torch's."""
    C = cost(2, 7, seed=1).half()
    with pytest.warns(RuntimeWarning, match="out of resource") as caught:
        first = optimize_permutation(C, eta=0.7, steps=3, kernel="fused")
    assert caught[0].filename == __file__
    later = optimize_permutation(C, eta=0.7, steps=3, kernel="fused")
    assert first.dtype == later.dtype == torch.float16
    assert_close(later, first, rtol=0, atol=0)
    assert_close(first, optimize_permutation(C.float(), eta=0.7, steps=3, kernel="chunked").half(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("with_init", [False, True])
def test_a_backward_kernel_triton_cannot_build_falls_back_with_the_same_gradients(monkeypatch, fresh_fallbacks,
                                                                                 fdevice, with_init):
    real = fused._kernels()

    class Kernels:
        forward_kernel = _Kernel("forward_kernel", works=real.forward_kernel)
        backward_kernel = _Kernel("backward_kernel")

    monkeypatch.setattr(fused, "_kernels", lambda: Kernels)
    mask = random_mask(3, 9, seed=1)
    C = cost(3, 9, seed=2, mask=mask)
    init = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64) if with_init else None
    with pytest.warns(RuntimeWarning, match="backward_kernel for sets padded to 16 .*out of resource.*unrolled"):
        P, grads = run(C, init, mask, 0.7, "fused", fdevice, steps=3)
    P_ref, grads_ref = run(C.float(), init if init is None else init.float(), mask, 0.7, "chunked", fdevice, steps=3)
    assert Kernels.forward_kernel.launches == 1                     # the forward kernel computed P
    assert_close(P, P_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):                          # recomputed through the unrolled steps
        assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)               # no second fallback, no second build
        run(C, init, mask, 0.7, "fused", fdevice, steps=3)
    assert Kernels.backward_kernel.launches == 1 and Kernels.forward_kernel.launches == 2


class _CountLaunchingOps(TorchDispatchMode):
    """Counts the torch operations that launch work on a device (not views, allocations or casts),
    except inside setperm.fused's Triton launches (which the interpreter runs with torch calls)."""
    QUIET = ("empty", "view", "unsqueeze", "squeeze", "select", "expand", "transpose", "alias", "detach",
             "_to_copy", "slice", "as_strided", "set_", "lift_fresh", "clone")

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not any(q in str(func) for q in self.QUIET):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _operations(kernel, steps, iters, monkeypatch, device):
    """(forward, backward) launching operations and Triton launches of one optimisation on the
    path a GPU takes (no host decisions: the log-domain Sinkhorn)."""
    for name in ("sinkhorn", "masking", "cost"):
        monkeypatch.setattr(importlib.import_module(f"setperm.{name}"), "host_decisions", lambda t: False)
    launches, modes = [0], []
    real = fused._launch

    def launch(*args, **kwargs):
        launches[0] += 1
        modes[-1].paused = True
        try:
            return real(*args, **kwargs)
        finally:
            modes[-1].paused = False
    monkeypatch.setattr(fused, "_launch", launch)
    mask = torch.arange(10) < torch.tensor([10, 7, 3, 9])[:, None]
    C = cost(4, 10, seed=0, mask=mask).float().to(device).requires_grad_(True)
    mask = mask.to(device)
    counts = []
    for part in ("forward", "backward"):
        modes.append(_CountLaunchingOps())
        with modes[-1]:
            if part == "forward":
                P = optimize_permutation(C, mask=mask, eta=1.0, steps=steps, sinkhorn_iters=iters, kernel=kernel)
            else:
                P.sum().backward()
        counts.append(modes[-1].count)
    return counts[0], counts[1], launches[0]


def test_the_fused_path_launches_a_few_operations_whatever_the_number_of_steps(fdevice, monkeypatch):
    fused_counts = {(T, L): _operations("fused", T, L, monkeypatch, fdevice) for T, L in ((1, 1), (3, 4), (6, 4))}
    assert len(set(fused_counts.values())) == 1                          # independent of T and L
    fwd, bwd, launches = fused_counts[(3, 4)]
    # (besides the kernels: the padding of the cost zeroed, the step matrix 2 eta C, their gradients,
    # the flags of the scratch slots zeroed)
    assert launches == 2 and fwd <= 5 and bwd <= 6
    unrolled = _operations("chunked", 3, 4, monkeypatch, fdevice)
    assert unrolled[0] >= 10 * fwd and unrolled[1] >= 10 * bwd and unrolled[2] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not HAS_TRITON, reason="needs two CUDA GPUs and Triton")
def test_cuda_kernels_run_on_the_tensors_gpu_not_the_current_one():
    mask = random_mask(3, 12, seed=4)
    C = cost(3, 12, seed=5, mask=mask)
    assert torch.cuda.current_device() == 0
    P, grads = run(C, None, mask, 0.7, "fused", torch.device("cuda:1"), steps=3)
    P_ref, grads_ref = run(C.float(), None, mask, 0.7, "chunked", torch.device("cuda:1"), steps=3)
    assert P.device == torch.device("cuda:1")
    assert_close(P, P_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- torch.compile
def _count_launches(monkeypatch):
    launches = {"forward_kernel": 0, "backward_kernel": 0}
    real = fused._launch

    def launch(kernel, *args, **kwargs):
        launches[kernel.__name__] += 1
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(fused, "_launch", launch)
    return launches


@pytest.mark.usefixtures("torch_compile_runs")
def test_under_torch_compile_the_kernels_are_one_operator_for_every_set_size(fdevice, monkeypatch):
    """A compiled optimisation (fullgraph: no graph break) calls the kernels, not the unrolled steps,
    at every set size without recompiling, with the eager values and gradients."""
    launches = _count_launches(monkeypatch)
    torch._dynamo.reset()

    def optimise(C, init, mask, eta):
        return optimize_permutation(C, init, mask, eta=eta, steps=3, kernel="fused")
    compiled = torch.compile(optimise, fullgraph=True, dynamic=True, backend="aot_eager")
    try:
        for i, N in enumerate((5, 9, 17)):                    # 16- and 32-wide tiles
            mask = random_mask(3, N, seed=N)
            C = cost(3, N, seed=N, mask=mask)
            init = torch.randn(3, N, N, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
            launches.update(forward_kernel=0, backward_kernel=0)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                P, grads = run(C, init, mask, 0.7, "fused", fdevice, fn=compiled)
            tiles = len(fused._tiles(N, per_set=True))        # one launch per tile size up to N's
            assert launches == {"forward_kernel": tiles, "backward_kernel": tiles}
            P_ref, grads_ref = run(C, init, mask, 0.7, "fused", fdevice, steps=3)
            assert_close(P, P_ref, rtol=1e-6, atol=1e-7)
            for g, g_ref in zip(grads, grads_ref):
                assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_the_encoder_compiled_by_inductor_with_the_fused_kernel_equals_chunked(fdevice, monkeypatch, request):
    if fdevice.type == "cpu":
        request.getfixturevalue("inductor_builds_on_cpu")
    launches = _count_launches(monkeypatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = PermutationSetEncoder(5, 12, PermutationOptimization(5, cost_hidden=16, steps=3, kernel="fused"))
    enc = enc.to(fdevice)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, 5, generator=g).to(fdevice)
    lengths = torch.tensor([9, 6, 1, 0])                              # host lengths: one graph
    try:
        out = torch.compile(enc)(x, lengths=lengths)
        grads = torch.autograd.grad(out.square().sum(), list(enc.parameters()))
        assert launches == {"forward_kernel": 1, "backward_kernel": 1}
        enc.po.cost.kernel = "chunked"
        ref = enc(x, lengths=lengths)
        ref_grads = torch.autograd.grad(ref.square().sum(), list(enc.parameters()))
        assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"),
                    reason="compiled graphs call the kernels as operators from torch 2.4 (custom_op)")
@pytest.mark.usefixtures("torch_compile_runs")
def test_under_torch_compile_a_kernel_triton_cannot_build_falls_back_at_run_time(monkeypatch, fresh_fallbacks):
    class Kernels:
        forward_kernel = _Kernel("forward_kernel")

    monkeypatch.setattr(fused, "unavailable", lambda: None)
    monkeypatch.setattr(fused, "interpreted", lambda: True)          # the CPU takes the kernels' path
    monkeypatch.setattr(fused, "_kernels", lambda: Kernels)
    torch._dynamo.reset()

    def optimise(C, init, mask, eta):
        return optimize_permutation(C, init, mask, eta=eta, steps=2, kernel="fused")
    compiled = torch.compile(optimise, fullgraph=True, backend="aot_eager")
    mask = random_mask(3, 6, seed=1)
    C = cost(3, 6, seed=0, mask=mask).float()
    init = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(3))
    try:
        with pytest.warns(RuntimeWarning, match="forward_kernel for sets padded to 16 .*out of resource"):
            P, grads = run(C, init, mask, 0.7, "fused", "cpu", steps=2, fn=compiled)
        P_ref, grads_ref = run(C, init, mask, 0.7, "chunked", "cpu", steps=2)
        assert_close(P, P_ref, rtol=1e-6, atol=1e-7)
        for g, g_ref in zip(grads, grads_ref):                           # recomputed through the unrolled steps
            assert_close(g, g_ref, rtol=1e-6, atol=1e-7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                                # once; and no second build
            run(C, init, mask, 0.7, "fused", "cpu", steps=2, fn=compiled)
        assert Kernels.forward_kernel.launches == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(fused._OPERATORS is None, reason="torch.library.custom_op needs torch 2.4")
def test_the_operators_schemas_name_the_implementations_arguments():
    """The schemas are written out (torch 2.4 cannot infer them from string annotations): they
    must follow the implementations' signatures."""
    import inspect
    forward, backward = (getattr(torch.ops.setperm, name).default._schema
                         for name in ("fused_forward", "fused_backward"))
    assert [a.name for a in forward.arguments] == list(inspect.signature(fused._forward).parameters)
    assert [a.name for a in backward.arguments] == list(inspect.signature(fused._backward).parameters)
    assert len(forward.returns) == 3 and len(backward.returns) == 2


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch 2.4")
@pytest.mark.usefixtures("torch_compile_runs")
def test_the_operators_pass_torch_library_opcheck(fdevice):
    """Schema, fake (shape) functions, autograd registration and the compiled (AOT) dispatch."""
    mask = random_mask(2, 7, seed=0).to(fdevice)
    C = cost(2, 7, seed=1, mask=mask.cpu()).float().to(fdevice).requires_grad_(True)
    init = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(2)).to(fdevice).requires_grad_(True)
    for args in ((C, init, mask, 2, 3, 1.0, True, None, True, True, True),
                 (C, init, mask, 2, 3, 1.0, True, None, True, False, True),
                 (C, None, None, 1, 0, 0.5, True, None, False, True, True)):
        torch.library.opcheck(fused._OPERATORS.forward, args)


def test_import_setperm_defines_no_operator_and_imports_no_triton():
    """The operators are defined when kernel="fused" is first used (setperm.fused imported), not
    by ``import setperm``."""
    code = ("import sys, torch\n"
            "triton_before = 'triton' in sys.modules\n"
            "import setperm\n"
            "assert 'setperm.fused' not in sys.modules and ('triton' in sys.modules) == triton_before\n"
            "assert not hasattr(torch.ops.setperm, 'fused_forward')\n"
            "import setperm.fused\n"
            "assert hasattr(torch.ops.setperm, 'fused_forward') == hasattr(torch.library, 'custom_op')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(repo / "src")
    subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, check=True)


def test_auto_takes_the_fused_kernels_on_cuda_only(fdevice, monkeypatch):
    """``kernel="auto"`` runs the fused kernels where they were measured faster, on CUDA; on the CPU
    (where the interpreter is a test tool) the unrolled steps. ``"fused"`` takes them on both."""
    calls = []
    real = fused.fused_optimize
    monkeypatch.setattr(fused, "fused_optimize", lambda *a, **k: calls.append(1) or real(*a, **k))
    mask = random_mask(3, 6, 0)
    C = cost(3, 6, 0, mask).to(fdevice, torch.float32)
    P_auto = optimize_permutation(C, None, mask.to(fdevice), eta=0.7, steps=2, kernel="auto")
    assert len(calls) == (1 if fdevice.type == "cuda" else 0)
    P_fused = optimize_permutation(C, None, mask.to(fdevice), eta=0.7, steps=2, kernel="fused")
    assert len(calls) == (2 if fdevice.type == "cuda" else 1)
    assert_close(P_auto, P_fused, rtol=1e-5, atol=1e-6)


def test_a_build_failure_is_named_by_the_error_at_the_root_of_its_chain():
    # Triton's CompilationError ends its text with a caret under the failing line; the reason is its cause
    try:
        try:
            raise AssertionError("Unsupported lhs dtype fp64")
        except AssertionError as cause:
            raise RuntimeError("at 12:8:\n    acc += tl.dot(a, b)\n           ^") from cause
    except RuntimeError as err:
        assert fused.failure_text(err) == "AssertionError: Unsupported lhs dtype fp64"
    assert fused.failure_text(RuntimeError("out of resource\nshared memory")) == "RuntimeError: shared memory"
    assert fused.failure_text(ValueError()) == "ValueError: ValueError()"
