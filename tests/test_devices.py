"""The core properties on every device (``device`` fixture of conftest: cpu, and cuda where present),
and the device-side form of every data-dependent choice.

Off the CPU (and under ``torch.compile``) the library takes no decision on the host: equal pairs come
from an exact matmul, Sinkhorn's ``method="auto"`` takes the log domain, the finite check is off by
default. On CUDA this is pinned with ``torch.cuda.set_sync_debug_mode("error")``; on the CPU the
same code path is forced (``host_decisions`` patched to False) and checked to give the CPU path's
values while no tensor is ever read on the host.
"""
import contextlib
import importlib
import importlib.util
import warnings

import pytest
import torch
from torch.testing import assert_close

from setperm import PermutationOptimization, PermutationSetEncoder
from setperm.functional import hungarian, sinkhorn
from setperm.cost import _equal_pairs_by_hash, _equal_pairs_on_device, equal_pairs

# (import_module: each submodule by its path, whatever names the package's namespace holds)
cost_mod, encoder_mod, masking_mod, pairwise_mod, sinkhorn_mod = (
    importlib.import_module(f"setperm.{name}") for name in ("cost", "encoder", "masking", "pairwise", "sinkhorn"))
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


@contextlib.contextmanager
def device_decisions(monkeypatch, refuse_reads=True):
    """Take the path CUDA takes, on the CPU: every ``host_decisions`` answers False, and (with
    ``refuse_reads``) reading a tensor's value on the host (``bool``, ``int``, ``float``, ``item``,
    ``tolist``, ``numpy``, or ``cpu``: a copy to the host) raises."""
    for mod in (masking_mod, cost_mod, sinkhorn_mod, encoder_mod):
        monkeypatch.setattr(mod, "host_decisions", lambda t: False)
    if not refuse_reads:
        yield
        monkeypatch.undo()
        return

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value on the host")
        return read

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    yield
    monkeypatch.undo()


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
def test_cuda_forward_and_backward_make_no_host_synchronisation():
    device = torch.device("cuda")
    x, w, mask = batch(device, dtype=torch.float32)
    lengths = torch.tensor(SIZES)                                    # host lengths: no copy for the LSTM
    for kernel in ("auto", "fused"):
        po = PermutationOptimization(4, cost_hidden=8, steps=2, kernel=kernel).to(device)
        enc = encoder(device, torch.float32, kernel=kernel)
        for _ in range(2):                                           # warm-up: compilation, cuBLAS handles
            po(x, mask=mask).sum().backward()
            enc(x, lengths=lengths, weights=w).sum().backward()
            enc(x, mask=mask, weights=w).sum().backward()
        torch.cuda.synchronize()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            xr = x.clone().requires_grad_(True)
            po(xr, mask=mask).sum().backward()
            enc(xr, lengths=lengths, weights=w).sum().backward()
            enc(xr, weights=w).sum().backward()
            enc(xr, mask=mask, weights=w).sum().backward()             # device sizes: the padded LSTM read
        finally:
            torch.cuda.set_sync_debug_mode(prev)


@pytest.mark.skipif(torch.__version__ < "2.1", reason="torch 2.0's LSTM reads its packed batch sizes (a host "
                    "tensor on every device) with int(), which the test cannot tell from a device read")
def test_device_path_reads_nothing_on_the_host_and_gives_the_cpu_values(monkeypatch):
    """What CUDA runs, run on the CPU: same values and gradients as the CPU's host-side choices."""
    x, w, mask = batch("cpu")
    lengths = torch.tensor(SIZES)
    results = []
    for forced in (False, True):
        enc = encoder("cpu")
        xr = x.clone().requires_grad_(True)
        with device_decisions(monkeypatch) if forced else contextlib.nullcontext():
            h = enc(xr, mask=mask, weights=w)
            h.sum().backward()
        # host lengths are validated on the host (no device read), so only the values are compared
        with device_decisions(monkeypatch, refuse_reads=False) if forced else contextlib.nullcontext():
            h2 = enc(xr, lengths=lengths, weights=w)
            h2.sum().backward()
        results.append((h, xr.grad, enc.po.eta_param.grad))
        assert_close(h2, h, rtol=1e-12, atol=1e-12)
    for a, b in zip(*results):
        assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_device_path_needs_no_finite_check_but_true_forces_it(monkeypatch):
    x, w, mask = batch("cpu")
    x[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encoder("cpu")(x, mask=mask, weights=w)                     # None: checked on the CPU
    for mod in (masking_mod, cost_mod, sinkhorn_mod, encoder_mod):
        monkeypatch.setattr(mod, "host_decisions", lambda t: False)
    h = encoder("cpu")(x, mask=mask, weights=w)                      # None off the CPU: not checked
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

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda name: broken)
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
