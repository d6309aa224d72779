"""The core properties on every device (``device`` fixture of conftest: cpu, and cuda where present),
and the device-side form of every data-dependent choice.

Off the CPU (and under ``torch.compile``) the library takes no decision on the host: equal pairs come
from an exact matmul, Sinkhorn's ``method="auto"`` takes the log domain, the finite check is off by
default. On CUDA this is pinned with ``torch.cuda.set_sync_debug_mode("error")``; on the CPU the
same code path is forced (``host_decisions`` patched to False) and checked to give the CPU path's
values while nothing makes the host wait for a device (conftest's ``device_path`` / ``HostWaits``:
no device value read on the host, no output sized by device values, no blocking copy to the device).
"""
import contextlib
import copy
import importlib
import importlib.util
import warnings

import pytest
import torch
from torch.testing import assert_close

from setperm import LinAssign, PairwiseCost, PermutationOptimization, PermutationSetEncoder
from setperm.functional import hungarian, pairwise_cost, sinkhorn
from setperm.cost import _equal_pairs_by_hash, _equal_pairs_on_device, equal_pairs

# (import_module: each submodule by its path, whatever names the package's namespace holds)
pairwise_mod, sinkhorn_mod = (importlib.import_module(f"setperm.{name}") for name in ("pairwise", "sinkhorn"))
SIZES = [5, 3, 1, 4]


def batch(device, dtype=torch.float64, D=4, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    N = max(sizes)
    x = torch.randn(len(sizes), N, D, generator=g, dtype=dtype)
    w = torch.randn(len(sizes), N, generator=g, dtype=dtype)
    mask = torch.arange(N) < torch.tensor(sizes)[:, None]
    return x.to(device), w.to(device), mask.to(device)


def encoder(device, dtype=torch.float64, kernel="auto", **kw):
    torch.manual_seed(0)
    po = PermutationOptimization(4, cost_hidden=8, steps=2, kernel=kernel)
    enc = PermutationSetEncoder(4, 6, po, **kw).to(device=device, dtype=dtype)
    with torch.no_grad():
        enc.po.cost.first.bias.normal_()          # non-zero biases: the scaling of f is exercised
    return enc


# ------------------------------------------------------------------------------- core properties
@pytest.mark.parametrize("variant", [{}, {"rnn": "gru", "pool": "sum"}, {"pool": "mean", "straight_through": True}])
def test_padded_equals_unpadded(device, variant):
    enc = encoder(device, **variant)
    x, w, mask = batch(device)
    h = enc(x, mask=mask, weights=w)
    for i, n in enumerate(SIZES):
        alone = enc(x[i:i + 1, :n], weights=w[i:i + 1, :n])
        assert_close(h[i:i + 1], alone, rtol=1e-10, atol=1e-10)


def test_invariant_to_the_order_of_the_elements(device):
    enc = encoder(device)
    x, w, mask = batch(device, sizes=[5, 5])
    perm = torch.tensor([3, 0, 4, 1, 2], device=device)
    assert_close(enc(x[:, perm], weights=w[:, perm]), enc(x, weights=w), rtol=1e-9, atol=1e-10)


def test_float64_gradcheck(device):
    po = PermutationOptimization(3, cost_hidden=4, steps=2).to(device=device, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    mask = torch.tensor([[True] * 4, [True, True, True, False]], device=device)
    assert torch.autograd.gradcheck(lambda t: po(t, mask=mask), (x,))


@pytest.mark.usefixtures("torch_compile_runs")
def test_kernels_agree(device, request):
    if device.type == "cpu":
        request.getfixturevalue("inductor_builds_on_cpu")     # "compiled" builds C++ kernels there
    x, w, mask = batch(device, dtype=torch.float32)
    outs, grads = [], []
    # "fused" runs its Triton kernels where they can run (CUDA; the CPU under Triton's interpreter),
    # elsewhere it is "compiled"
    for kernel in ("chunked", "compiled", "auto", "fused"):
        enc = encoder(device, torch.float32, kernel=kernel)
        xr = x.clone().requires_grad_(True)
        out = enc(xr, mask=mask, weights=w)
        out.sum().backward()
        outs.append(out)
        grads.append(xr.grad)
    for out, grad in zip(outs[1:], grads[1:]):
        assert_close(out, outs[0], rtol=1e-5, atol=1e-6)
        assert_close(grad, grads[0], rtol=1e-4, atol=1e-5)


def test_auto_kernel_resolves_per_device(monkeypatch):
    monkeypatch.setattr(pairwise_mod, "_auto_fallback", {})
    warnings.simplefilter("ignore", RuntimeWarning)     # (a machine without Triton is warned about)
    expected = {"cpu": "chunked", "cuda": "compiled" if pairwise_mod.fused_unavailable("cuda") is None else "chunked"}
    for dev, kernel in expected.items():
        assert pairwise_mod.resolve_kernel("auto", torch.device(dev)) == kernel
    assert pairwise_mod.resolve_kernel("compiled", torch.device("cpu")) == "compiled"   # explicit choices stay
    assert pairwise_mod.resolve_kernel("fused", torch.device("cpu")) == "compiled"      # its pairwise MLP


def test_hungarian_takes_tensors_of_any_device(device):
    P = sinkhorn(torch.randn(2, 4, 4).to(device))
    mask = torch.tensor([[True] * 4, [True, True, False, False]], device=device)
    idx, hard = hungarian(P, mask=mask, return_matrix=True)
    assert idx.device == P.device and hard.device == P.device
    assert_close(idx.cpu(), hungarian(P.cpu(), mask=mask.cpu()))


# ---------------------------------------------------------------------- no host synchronisation
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_forward_and_backward_make_no_host_synchronisation(without_cuda_sync):
    device = torch.device("cuda")
    x, w, mask = batch(device, dtype=torch.float32)
    lengths = torch.tensor(SIZES)                                    # host lengths: no copy for the LSTM
    host_mask = mask.cpu()                                           # (copied to the host before the check)
    for kernel in ("auto", "fused"):
        po = PermutationOptimization(4, cost_hidden=8, steps=2, kernel=kernel).to(device)
        enc = encoder(device, torch.float32, kernel=kernel)
        for _ in range(2):                                           # warm-up: compilation, cuBLAS handles
            po(x, mask=mask).sum().backward()
            enc(x, lengths=lengths, weights=w).sum().backward()
            enc(x, mask=mask, weights=w).sum().backward()
        torch.cuda.synchronize()
        xr = x.clone().requires_grad_(True)
        without_cuda_sync(lambda: po(xr, mask=mask))
        without_cuda_sync(lambda: enc(xr, lengths=lengths, weights=w))
        without_cuda_sync(lambda: enc(xr, weights=w))
        without_cuda_sync(lambda: enc(xr, mask=mask, weights=w))         # device sizes: the padded LSTM read
        without_cuda_sync(lambda: enc(xr, mask=host_mask, weights=w))    # a host mask is copied without a wait


class _Positional(torch.nn.Module):
    """``encoder(x, mask=, weights=)`` with positional arguments (what make_graphed_callables passes)."""

    def __init__(self, encoder, masked):
        super().__init__()
        self.encoder, self.masked = encoder, masked

    def forward(self, x, w, mask):
        return self.encoder(x, mask=mask if self.masked else None, weights=w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("masked", [False, True], ids=["full", "mask"])
@pytest.mark.parametrize("read", ["auto", "fused"])
def test_cuda_graphs_replay_the_encoder_as_eager(read, masked):
    """The default CUDA path makes no host synchronisation and sizes nothing by device values, so the
    encoder's forward and backward can be recorded as CUDA graphs (torch.cuda.make_graphed_callables,
    as torch.compile's mode="reduce-overhead" also records them) and replayed: a replay on other
    inputs, set sizes included (the fused kernels read them on the device), gives the eager values
    and gradients."""
    device = torch.device("cuda")
    x, w, mask = batch(device, dtype=torch.float32)
    enc = encoder(device, torch.float32, read=read)
    eager = copy.deepcopy(enc)
    graphed = torch.cuda.make_graphed_callables(_Positional(enc, masked), (x.clone().requires_grad_(True), w, mask),
                                                num_warmup_iters=3, allow_unused_input=True)
    for seed, sizes in ((1, [2, 5, 4, 1]), (2, SIZES)):
        x2, w2, mask2 = batch(device, dtype=torch.float32, seed=seed, sizes=sizes)
        results = []
        for run in (graphed, _Positional(eager, masked)):
            for p in (*enc.parameters(), *eager.parameters()):
                p.grad = None
            xr = x2.clone().requires_grad_(True)
            out = run(xr, w2, mask2)
            out.pow(2).sum().backward()
            module = enc if run is graphed else eager
            results.append((out.detach().clone(), xr.grad, [p.grad for p in module.parameters()]))
        (out, gx, grads), (want, want_gx, want_grads) = results
        assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert_close(gx, want_gx, rtol=1e-5, atol=1e-6)
        for g, want_g in zip(grads, want_grads):
            assert_close(g, want_g, rtol=1e-5, atol=1e-6)


class _SyncsInBackward(torch.autograd.Function):
    """Stands for an operation whose CUDA backward waits for the host (raises as sync-debug mode does)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("called a synchronizing CUDA operation")


def test_the_sync_check_names_the_backward_node_where_the_host_waits(monkeypatch, without_cuda_sync):
    """The CUDA no-synchronisation tests' helper, run on the CPU with the debug mode's switch stubbed:
    a wait in backward fails the test naming the node that had started; other errors pass through."""
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    x = torch.randn(3, requires_grad=True)
    without_cuda_sync(lambda: (x * 3).exp())
    assert modes == ["error", 0]
    with pytest.raises(pytest.fail.Exception, match=r"backward synchronises with the host in _SyncsInBackwardBackward"):
        without_cuda_sync(lambda: _SyncsInBackward.apply(x.exp()) * 3)
    with pytest.raises(pytest.fail.Exception, match="forward synchronises with the host"):
        without_cuda_sync(lambda: _SyncsInBackward.backward(None, x))
    with pytest.raises(RuntimeError, match="something else"):
        without_cuda_sync(lambda: (_ for _ in ()).throw(RuntimeError("something else")))
    assert modes[-1] == 0                                              # the previous mode is back


def variant_encoder(po="po-u", **kw):
    """The encoder of :func:`encoder` with another permutation module (PO-LA, LinAssign, none)."""
    torch.manual_seed(0)
    key = kw.get("order_features") or 4
    if po == "linassign":
        po = LinAssign(key, 5)
    elif po is not None:
        po = PermutationOptimization(key, cost_hidden=8, steps=2, permutation=po,
                                     num_positions=5 if po == "po-la" else None)
    return PermutationSetEncoder(4, 6, po, **kw).double()


VARIANTS = [{}, {"rnn": "gru", "pool": "sum"}, {"pool": "attention"}, {"pool": "mean"},
            {"po": "po-la"}, {"po": "linassign"}, {"po": None}, {"order_features": 2}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_device_path_makes_the_host_wait_nowhere_and_gives_the_cpu_values(device_path, variant):
    """What CUDA runs, run on the CPU: the same values and gradients as the CPU's host-side choices,
    and nothing that makes the host wait for a device (conftest's ``HostWaits``): neither with a
    ``mask`` nor with ``lengths`` kept on the host."""
    x, w, mask = batch("cpu")
    lengths = torch.tensor(SIZES)
    results = []
    for forced in (False, True):
        enc = variant_encoder(**variant)
        xr = x.clone().requires_grad_(True)
        kw = {"weights": w, "order_by": xr[..., :2].flip(-1)} if "order_features" in variant else {"weights": w}
        with device_path() if forced else contextlib.nullcontext():
            h = enc(xr, mask=mask, **kw)
            h.sum().backward()
        with device_path(host=(lengths,)) if forced else contextlib.nullcontext():
            h2 = enc(xr, lengths=lengths, **kw)
            h2.sum().backward()
        results.append((h, xr.grad) + tuple(p.grad for p in enc.parameters()))
        assert_close(h2, h, rtol=1e-12, atol=1e-12)
    for a, b in zip(*results):
        assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_device_lengths_make_the_host_wait_in_their_range_check(device_path):
    """``lengths`` on the device (as the encoder's docstring says) are read on the host by their
    check that they lie in [0, N] (a bad length is a ValueError): one wait, which a mask does not
    make (nor host lengths, test above). (Past that check the CPU cannot stand in for CUDA here:
    the encoder tells host lengths from device lengths by their device.)"""
    import traceback

    x, w, mask = batch("cpu")
    device_lengths = torch.tensor(SIZES)                  # made outside device_path: a device tensor there
    enc = variant_encoder()
    with device_path():
        enc(x, mask=mask, weights=w)
    with pytest.raises(AssertionError, match="on CUDA the host would wait") as caught, device_path():
        enc(x, lengths=device_lengths, weights=w)
    setperm_frames = [f.name for f in traceback.extract_tb(caught.tb) if "setperm" in f.filename]
    assert setperm_frames[-1] == "resolve_mask", setperm_frames


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_tensor_made_on_the_way_is_on_the_inputs_device(on_meta, variant):
    """Forward and backward on the ``meta`` device (shapes and dtypes, no values; on every machine),
    which like CUDA refuses to combine its tensors with a CPU tensor of more than zero dimensions:
    a tensor made without ``device=`` anywhere on the path that CUDA takes (``meta`` is not the CPU,
    so no choice is taken on the host) raises here. Also how a FLOP counter or a shape check runs a
    model without data."""
    x, w, mask = (t.to("meta") for t in batch("cpu"))
    enc = variant_encoder(**variant).to("meta")
    xr = x.clone().requires_grad_(True)
    kw = {"weights": w, "order_by": xr[..., :2].flip(-1)} if "order_features" in variant else {"weights": w}
    for how in ({"mask": mask}, {"lengths": torch.tensor(SIZES)}, {"lengths": SIZES}, {}):
        with on_meta():
            h = enc(xr, **how, **kw)
            h.sum().backward()
        assert h.shape == (len(SIZES), 6) and h.device.type == "meta" and h.dtype == torch.float64
    assert xr.grad.device.type == "meta" and xr.grad.shape == x.shape
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "meta" for g in grads)


def test_a_flop_count_on_meta_tensors_equals_the_count_with_data(on_meta, device_path, flop_counter):
    """What the layer computes on ``meta`` is what it computes on the path CUDA takes: the same FLOPs."""
    counts = []
    for device in ("meta", "cpu"):
        x, w, mask = (t.to(device) for t in batch("cpu"))
        enc = variant_encoder().to(device)
        counter = flop_counter.FlopCounterMode(display=False)
        with on_meta(), device_path(refuse=False), counter:
            enc(x.requires_grad_(True), mask=mask, weights=w).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


@pytest.mark.parametrize("module", [
    lambda: PermutationOptimization(4, cost_hidden=8, steps=2, grid=(2, 3)),
    lambda: PermutationOptimization(4, cost_hidden=8, steps=2, grid=(2, 3), permutation="po-la", num_positions=6),
    lambda: LinAssign(4, 6, grid=(2, 3))], ids=["po-u-lattice", "po-la-lattice", "linassign-lattice"])
def test_the_lattice_variants_put_every_tensor_on_the_inputs_device(on_meta, module):
    """The same on ``meta`` for the lattice cost (paper 2.4, the mosaics), every soft step returned."""
    po = module().to("meta")
    x = torch.randn(3, 6, 4, device="meta", requires_grad=True)
    mask = (torch.arange(6) < torch.tensor([6, 4, 6])[:, None]).to("meta")       # one padded set
    with on_meta():
        steps = po(x, mask=mask, return_steps=True)
        sum(P.sum() for P in steps).backward()
    assert all(P.shape == (3, 6, 6) and P.device.type == "meta" for P in steps)
    assert x.grad.device.type == "meta" and all(p.grad.device.type == "meta" for p in po.parameters())


@pytest.mark.parametrize("build, culprit", [
    (lambda: PermutationSetEncoder(4, 6).to("meta"), "LSTM"),
    (lambda: PermutationSetEncoder(4, 6, rnn="gru").to("meta"), "GRU"),
    (lambda: PermutationSetEncoder(4, 6, PermutationOptimization(4, device="meta")), "PermutationOptimization"),
    (lambda: PermutationOptimization(4).to("meta"), "PermutationOptimization"),
    (lambda: LinAssign(4, 5).to("meta"), "LinAssign"),
    (lambda: PairwiseCost(4, 8).to("meta"), "PairwiseCost"),
    (lambda: lambda x: pairwise_cost(x, *(torch.zeros(s, device="meta") for s in ((8, 8), (8,))), [],
                                     torch.zeros(1, 8)), "first_weight"),
], ids=["encoder", "gru-encoder", "its-po", "po", "linassign", "cost", "functional-cost"])
def test_an_input_on_another_device_than_the_module_is_named(build, culprit):
    """A set left on the CPU beside a module moved elsewhere (``meta`` here, CUDA in use) is refused
    by name before any operation mixes them (torch's own error names neither)."""
    module = build()
    with pytest.raises(ValueError, match=f"x is on cpu but .*{culprit}.* is on meta|{culprit} is on meta but x"):
        module(torch.randn(2, 5, 4))


def test_the_host_wait_check_refuses_what_synchronises_on_cuda_and_allows_host_work(device_path):
    """conftest's ``HostWaits`` itself: each way of making the host wait is refused, naming it; host
    tensors may be read, and reach the device with a non-blocking copy."""
    x, lengths = torch.randn(3, 4), torch.tensor([4, 2, 1])
    waits = [lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(x.argmax()), lambda: x.tolist(),
             lambda: x.numpy(), lambda: x.cpu(), lambda: x.to("cpu"), lambda: x[x > 0], lambda: x.nonzero(),
             lambda: torch.where(x > 0), lambda: x.unique(), lambda: torch.masked_select(x, x > 0),
             lambda: torch.equal(x, x), lambda: x.long().clamp(0, 3).flatten().bincount(),
             lambda: x.new_tensor([1.0]), lambda: torch.tensor(1.0, device=x.device),
             lambda: torch.as_tensor([1, 2], device=x.device), lambda: lengths.to(x.device),
             lambda: lengths.new_zeros(3).copy_(x.sum(1)),
             lambda: torch.repeat_interleave(x.long().abs() % 2)]
    for wait in waits:
        with device_path(host=(lengths,)), pytest.raises(AssertionError, match="the host would wait"):
            wait()
    with device_path(host=(lengths,)):
        assert int(lengths.max()) == 4 and lengths.tolist() == [4, 2, 1]            # host values
        counts = torch.as_tensor([3, 1])                                         # made on the host
        assert int(counts.sum()) == 4 and counts.cpu().numpy().tolist() == [3, 1]
        mask = torch.arange(4) < lengths.to(x.device, non_blocking=True)[:, None]
        packed = torch.nn.utils.rnn.pack_padded_sequence(x[:, :, None], lengths, batch_first=True)
        torch.nn.LSTM(1, 2, batch_first=True)(packed)                              # reads its host batch sizes
    assert torch.equal(mask.sum(1), lengths)


def test_device_path_needs_no_finite_check_but_true_forces_it(device_path):
    x, w, mask = batch("cpu")
    x[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encoder("cpu")(x, mask=mask, weights=w)                     # None: checked on the CPU
    with device_path(refuse=False):
        h = encoder("cpu")(x, mask=mask, weights=w)                  # None off the CPU: not checked
        assert torch.isnan(h[1]).any() and torch.isfinite(h[[0, 2, 3]]).all()   # NaN stays in its set
        with pytest.raises(ValueError, match="non-finite"):
            encoder("cpu", check_finite=True)(x, mask=mask, weights=w)
    with pytest.raises(ValueError, match="check_finite"):
        PermutationSetEncoder(4, 6, check_finite="yes")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_equal_pairs_on_device_equals_the_elementwise_test(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 5, generator=g).to(dtype)
    x[0, 3] = x[0, 1]                                   # duplicates
    x[1, :] = x[1, 2]                                   # all equal
    x[2, 4] = -0.0 * x[2, 4].abs()                      # -0.0 vs +0.0
    x[2, 5] = 0.0
    x[2, 6, 2] = float("nan")                           # NaN: not equal, not even to itself
    x[2, 0] = x[2, 6]
    literal = (x[:, :, None, :] == x[:, None, :, :]).all(-1)
    assert torch.equal(_equal_pairs_on_device(x), literal)
    assert torch.equal(equal_pairs(x), literal)
    fast = _equal_pairs_by_hash(x)
    assert fast is None or torch.equal(fast, literal)


@pytest.mark.parametrize("dtype,word", [(torch.float16, torch.int16), (torch.float32, torch.int32),
                                        (torch.float64, torch.int64)])
def test_equal_pairs_on_device_tell_elements_apart_by_any_single_bit(dtype, word):
    """Elements that differ in one bit of one feature (each bit position in turn: mantissa, exponent,
    sign), among many features of arbitrary bit patterns, are unequal; copies are equal."""
    g = torch.Generator().manual_seed(6)
    D, nbits = 40, torch.finfo(dtype).bits
    base = torch.randn(1, 1, D, generator=g).to(dtype) * 1e3
    rows = [base[0, 0]]
    for b in range(nbits):
        flipped = base[0, 0].clone().view(word)
        flipped[b % D] ^= (1 << b) if b < nbits - 1 else torch.iinfo(word).min    # the sign bit last
        rows.append(flipped.view(dtype))
    rows.append(base[0, 0].clone())                                              # a copy
    x = torch.stack(rows).unsqueeze(0)                                           # (1, nbits + 2, D)
    finite = torch.isfinite(x).all(-1)
    literal = (x[:, :, None, :] == x[:, None, :, :]).all(-1)
    got = _equal_pairs_on_device(x)
    assert torch.equal(got, literal)
    assert got[0, 0, -1] and got[0, -1, 0]                                       # the copy
    assert not got[0, 0, 1:-1][finite[0, 1:-1]].any()                            # every flipped finite row differs


def test_sinkhorn_auto_takes_the_log_domain_off_the_cpu(monkeypatch):
    z = torch.randn(3, 6, 6, dtype=torch.float64) * 30
    mask = torch.arange(6) < torch.tensor([6, 4, 2])[:, None]
    cpu = sinkhorn(z, mask=mask)
    monkeypatch.setattr(sinkhorn_mod, "host_decisions", lambda t: False)
    calls = []
    monkeypatch.setattr(sinkhorn_mod, "_scalings", lambda *a, **k: calls.append(1))
    assert_close(sinkhorn(z, mask=mask), cpu, rtol=1e-10, atol=1e-12)
    assert_close(sinkhorn(z, mask=mask), sinkhorn(z, mask=mask, method="log"), rtol=0, atol=0)
    assert not calls                                    # the range check (a host sync) never ran


# --------------------------------------------------------------------------------- torch.compile
@pytest.mark.skipif(torch.__version__ < "2.7", reason="dynamo of torch 2.6 and older breaks the graph at the "
                    "autograd functions (2.5 and older: a separate setup_context; 2.6: a non-tensor output)")
@pytest.mark.usefixtures("torch_compile_runs")
def test_the_whole_optimisation_compiles_as_one_graph():
    """PermutationOptimization (cost, unrolled steps, Sinkhorn) traced by dynamo without a graph break,
    forward and backward (aot_eager: the graphs without inductor's code generation)."""
    po = PermutationOptimization(4, cost_hidden=8, steps=2)
    x, _, mask = batch("cpu", dtype=torch.float32)
    explanation = torch._dynamo.explain(po)(x, mask)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(po)(x, key_padding_mask=~mask)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    # lengths are range-checked on the host: a graph break (README), so fullgraph=True needs a mask
    explanation = torch._dynamo.explain(po)(x, lengths=mask.sum(1))
    assert explanation.graph_break_count >= 1
    torch._dynamo.reset()
    compiled = torch.compile(po, fullgraph=True, backend="aot_eager")
    xr, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    P, Pc = po(xr, mask), compiled(xc, mask)
    (P * torch.arange(25.0).view(5, 5)).sum().backward()
    (Pc * torch.arange(25.0).view(5, 5)).sum().backward()
    assert_close(Pc, P, rtol=1e-5, atol=1e-6)
    assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("kernel", ["auto", "fused"])
def test_auto_and_fused_fall_back_once_with_the_reason_when_the_compiled_kernel_cannot_be_built(monkeypatch, kernel, build_failure):
    def broken(*args):
        raise build_failure("no working compiler")

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: broken)
    monkeypatch.setattr(pairwise_mod, "resolve_kernel",
                        lambda kernel, device: kernel if kernel in ("chunked", "compiled")
                        else ("chunked" if pairwise_mod._auto_fallback else "compiled"))
    monkeypatch.setattr(pairwise_mod, "_auto_fallback", {})
    g = torch.Generator().manual_seed(0)
    a, c, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 4, 3), (2, 4, 3), (1, 3)))
    with pytest.warns(RuntimeWarning, match="cannot be built on cpu .*no working compiler.*kernel='chunked'"):
        out = pairwise_mod.pairwise_two_layer(a, c, w2, kernel=kernel)
    assert_close(out, pairwise_mod.pairwise_two_layer(a, c, w2, kernel="chunked"), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once: later calls use chunked without a word
        pairwise_mod.pairwise_two_layer(a, c, w2, kernel=kernel)
    with pytest.raises(RuntimeError, match="could not be compiled"):
        pairwise_mod.pairwise_two_layer(a, c, w2, kernel="compiled")   # an explicit "compiled" does not


@pytest.mark.skipif(importlib.util.find_spec("torch.utils._triton") is None,
                    reason="this torch has no torch.utils._triton to ask")
def test_auto_names_a_missing_triton(monkeypatch):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    monkeypatch.setattr(pairwise_mod, "_auto_fallback", {})
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert pairwise_mod.resolve_kernel("auto", torch.device("cuda")) == "chunked"
    assert pairwise_mod.resolve_kernel("auto", torch.device("cuda")) == "chunked"
