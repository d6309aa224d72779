"""setperm.fused_read: the LSTM read as Triton kernels equals nn.LSTM read set by set.

On CUDA the kernels run compiled; on the CPU in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1`` before Triton is imported where there is no CUDA). Without Triton the
kernels' tests skip; what happens without them is tested everywhere.
"""
import importlib
import json
import os
import tempfile
import types
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from setperm import PermutationSetEncoder
from setperm.encoder import last_state

fused = importlib.import_module("setperm.fused")
fused_read = importlib.import_module("setperm.fused_read")
HAS_TRITON = fused.unavailable() is None


def batch(B, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, N + 1, (B,), generator=g)
    lengths[0] = 0                                         # an empty set
    lengths[-1] = N                                        # a full one
    seq = torch.randn(B, N, D, generator=g, dtype=dtype)
    return seq, lengths


def read(lstm, seq, lengths, method, up):
    """The final cell states and the gradients of <c, up> with respect to the input and every parameter."""
    seq = seq.detach().requires_grad_(True)
    c = last_state(lstm, seq, lengths, method=method)
    grads = torch.autograd.grad((c * up).sum(), [seq, *lstm.parameters()])
    return c, grads


@pytest.mark.parametrize("B, N, D, H", [
    (5, 6, 3, 7),            # hidden units not a power of two
    (37, 9, 4, 16),          # three programs, the last one part-full
    (18, 12, 13, 40),        # sets of different lengths in one program
    (17, 10, 13, 128),       # the encoder's VQA width, the widest the kernels take
    (3, 1, 2, 5),            # one step
])
def test_the_fused_read_equals_the_lstm_read_set_by_set(fdevice, B, N, D, H):
    torch.manual_seed(0)
    lstm = nn.LSTM(D, H, batch_first=True).to(fdevice)
    seq, lengths = batch(B, N, D, seed=B + N)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    up = torch.randn(B, H, generator=torch.Generator().manual_seed(1)).to(fdevice)
    c, grads = read(lstm, seq, lengths, "fused", up)
    c_ref, grads_ref = read(lstm, seq, lengths, "grouped", up)
    assert_close(c, c_ref, atol=2e-6, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, atol=2e-5, rtol=1e-4)
    assert c[0].abs().max() == 0                              # the empty set: c = 0
    assert grads[0][0].abs().max() == 0


def test_float64_gradients_of_every_input_match_finite_differences(fdevice):
    # gradcheck through the input, W_ih, W_hh and both biases (float64 end to end)
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3, batch_first=True).to(fdevice, torch.float64)
    seq, lengths = batch(3, 4, 2, seed=3, dtype=torch.float64)
    lengths[1] = 2
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    names = [name for name, _ in lstm.named_parameters()]

    def fn(x, *params):
        with torch.nn.utils.stateless._reparametrize_module(lstm, dict(zip(names, params))):
            return last_state(lstm, x, lengths, method="fused")
    inputs = (seq.requires_grad_(True), *(p.detach().clone().requires_grad_(True) for p in lstm.parameters()))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_padding_of_any_value_reaches_neither_the_state_nor_a_gradient(fdevice):
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 16, batch_first=True).to(fdevice)
    seq, lengths = batch(6, 7, 4, seed=5)
    padded = torch.arange(7) >= lengths.unsqueeze(1)
    dirty = seq.masked_fill(padded.unsqueeze(-1), float("nan"))
    dirty[1, -1] = float("inf")
    up = torch.randn(6, 16).to(fdevice)
    c, grads = read(lstm, dirty.to(fdevice), lengths.to(fdevice), "fused", up)
    c_ref, grads_ref = read(lstm, seq.masked_fill(padded.unsqueeze(-1), 0).to(fdevice), lengths.to(fdevice), "fused",
                            up)
    assert_close(c, c_ref, atol=0, rtol=0)                     # held steps are selected past, not computed with
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, atol=0, rtol=0)
    assert grads[0][padded.to(fdevice)].abs().max() == 0


def test_backward_keeps_each_step_s_cell_and_gates_and_the_input(fdevice):
    # per element: the input (D), the cell (H) and the four activated gates (4 H), and the
    # real-step mask of the zeroed padding; h is recomputed in backward
    B, N, D, H = 5, 6, 3, 16
    lstm = nn.LSTM(D, H, batch_first=True).to(fdevice)
    seq, lengths = batch(B, N, D, seed=0)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        last_state(lstm, seq.to(fdevice).requires_grad_(True), lengths.to(fdevice), method="fused")
    per_element = sorted(shape[2:] for shape in saved if shape[:2] == (B, N))
    assert per_element == sorted([(1,), (D,), (H,), (4 * H,)]), saved


def peak_bytes(fn, device):
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it: the CUDA allocator's
    count (as the GPU benchmark reads it), or on the CPU the profiler's running count of the tensors
    allocated during the call."""
    if device.type == "cuda":
        from benchmarks.gpu import peak_memory

        return peak_memory(fn, device)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "the profiler recorded no allocation"
    return max(totals)


def test_forward_and_backward_hold_five_hidden_numbers_per_element(fdevice):
    # the input gates' buffer takes the activated gates in forward and their gradients in backward,
    # and c takes h_{t-1}: at no time more than 5 H numbers per element (plus the input's few)
    # (on CUDA larger, so that a library's workspace, e.g. cuBLASLt's on torch versions that allocate it
    # per call, fits the slack while the bound still tells 5 H from 13 H per element)
    (B, N, D, H), slack = ((256, 32, 3, 64), 2 ** 22) if fdevice.type == "cuda" else ((64, 16, 3, 32), 2 ** 18)
    lstm = nn.LSTM(D, H, batch_first=True).to(fdevice)
    seq, lengths = batch(B, N, D, seed=7)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)

    def step():
        x = seq.detach().requires_grad_(True)
        last_state(lstm, x, lengths, method="fused").sum().backward()
    step()                                                    # (library workspaces allocated before)
    lstm.zero_grad(set_to_none=True)
    element = 4 * B * N                                       # bytes of one float32 number per element
    weights = 4 * 4 * H * (D + H + 2)                         # the parameters' gradients
    budget = element * (5 * H + 3 * D + 2) + weights + slack
    assert peak_bytes(step, fdevice) <= budget               # (13 H per element before the buffers were shared)


def test_a_second_backward_through_the_graph_gives_the_same_gradients(fdevice):
    # backward writes over what forward kept; retain_graph=True then recomputes it
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 16, batch_first=True).to(fdevice)
    seq, lengths = batch(9, 7, 3, seed=8)
    seq, lengths = seq.to(fdevice).requires_grad_(True), lengths.to(fdevice)
    c = last_state(lstm, seq, lengths, method="fused")
    params = [seq, *lstm.parameters()]
    first = torch.autograd.grad(c.sum(), params, retain_graph=True)
    second = torch.autograd.grad(c.sum(), params, retain_graph=True)
    third = torch.autograd.grad(c.sum(), params)
    _, expected = read(lstm, seq, lengths, "grouped", torch.ones_like(c))
    for a, b, d, e in zip(first, second, third, expected):
        assert_close(a, e, atol=2e-5, rtol=1e-4)
        assert_close(b, a)                                    # (recomputed: the same kernels again)
        assert_close(d, a)


def test_the_kernels_never_step_past_the_padded_length(fdevice):
    # last_state's lengths are 0 <= lengths <= N (the encoder checks them); a larger one reads N steps
    lstm = nn.LSTM(3, 16, batch_first=True).to(fdevice)
    seq = torch.randn(2, 4, 3).to(fdevice)
    too_long = last_state(lstm, seq.requires_grad_(True), torch.tensor([9, 2]).to(fdevice), method="fused")
    too_long.sum().backward()
    assert_close(too_long, last_state(lstm, seq, torch.tensor([4, 2]).to(fdevice), method="fused"))


def test_a_batch_of_empty_sets_gives_zero_states_and_zero_gradients(fdevice):
    lstm = nn.LSTM(3, 8, batch_first=True).to(fdevice)
    seq = torch.randn(4, 5, 3, device=fdevice)
    c, grads = read(lstm, seq, torch.zeros(4, dtype=torch.int64, device=fdevice), "fused", torch.ones(4, 8, device=fdevice))
    assert c.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)


def test_half_inputs_are_read_in_float32_under_autocast(fdevice):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 16, batch_first=True).to(fdevice)
    seq, lengths = batch(4, 6, 5, seed=2)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    with torch.autocast(fdevice.type, dtype=torch.bfloat16):
        c = last_state(lstm, seq.bfloat16(), lengths, method="fused")
    assert c.dtype == torch.float32
    assert_close(c, last_state(lstm, seq.bfloat16().float(), lengths, method="grouped"), atol=2e-6, rtol=1e-5)


def test_without_gradients_the_read_keeps_nothing_for_backward(fdevice):
    lstm = nn.LSTM(3, 16, batch_first=True).to(fdevice)
    seq, lengths = batch(5, 8, 3, seed=4)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    with torch.no_grad():
        c = last_state(lstm, seq, lengths, method="fused")
    assert c.grad_fn is None
    assert_close(c, last_state(lstm, seq, lengths, method="grouped").detach(), atol=2e-6, rtol=1e-5)


def test_second_derivatives_equal_those_of_the_lstm_read(fdevice):
    # a backward that is itself differentiated (a gradient penalty) runs the recurrence in torch operations
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 8, batch_first=True).to(fdevice, torch.float64)
    seq, lengths = batch(4, 5, 3, seed=1, dtype=torch.float64)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    out = []
    for method in ("fused", "grouped"):
        x = seq.clone().requires_grad_(True)
        c = last_state(lstm, x, lengths, method=method)
        (g,) = torch.autograd.grad(c.pow(2).sum(), x, create_graph=True)
        out.append(torch.autograd.grad(g.pow(2).sum(), [x, *lstm.parameters()]))
    for a, b in zip(*out):
        assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_the_encoder_reads_fused_the_same_set_vector(fdevice):
    torch.manual_seed(0)
    enc = PermutationSetEncoder(5, 16, read="fused").to(fdevice)
    ref = PermutationSetEncoder(5, 16, read="grouped").to(fdevice)
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(6, 7, 5)
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[0], mask[1] = False, True
    x, mask = x.to(fdevice), mask.to(fdevice)
    w = torch.randn(6, 7).to(fdevice)
    for m in (mask, None):
        h, h_ref = enc(x, mask=m, weights=w), ref(x, mask=m, weights=w)
        assert_close(h, h_ref, atol=2e-6, rtol=1e-5)
        grads = torch.autograd.grad(h.pow(2).sum(), list(enc.parameters()))
        grads_ref = torch.autograd.grad(h_ref.pow(2).sum(), list(ref.parameters()))
        for g, g_ref in zip(grads, grads_ref):
            assert_close(g, g_ref, atol=2e-5, rtol=1e-4)
    # a set alone equals it padded
    assert_close(enc(x[2:3, mask[2]]), enc(x[2:3], mask=mask[2:3]), atol=2e-6, rtol=1e-5)


def test_the_fused_read_makes_the_host_wait_nowhere(fdevice, device_path):
    lstm = nn.LSTM(4, 16, batch_first=True).to(fdevice)
    seq, lengths = batch(5, 6, 4, seed=6)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    with device_path(exempt=[(fused_read, "_launch")]) as waits:
        c = last_state(lstm, seq.requires_grad_(True), lengths, method="fused")
        c.sum().backward()
    assert waits.calls["_launch"] == 2                        # forward and backward: both kernels ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_fused_read_makes_no_host_synchronisation(without_cuda_sync):
    if not HAS_TRITON:
        pytest.skip(fused.unavailable())
    lstm = nn.LSTM(13, 128, batch_first=True).cuda()
    seq, lengths = batch(40, 30, 13, seed=0)
    seq, lengths = seq.cuda().requires_grad_(True), lengths.cuda()
    without_cuda_sync(lambda: last_state(lstm, seq, lengths, method="fused"))
    enc = PermutationSetEncoder(13, 128, read="fused").cuda()
    mask = torch.arange(30, device="cuda") < lengths.unsqueeze(1)
    without_cuda_sync(lambda: enc(seq, mask=mask))


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_a_compiled_encoder_reads_as_auto_inside_its_graph(fdevice):
    # the kernels are not operators of a compiled graph: torch.compile traces the automatic read
    torch.manual_seed(0)
    enc = PermutationSetEncoder(5, 16, read="fused").to(fdevice)
    x = torch.randn(3, 4, 5).to(fdevice)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool).to(fdevice)
    assert_close(torch.compile(enc)(x, mask=mask), enc(x, mask=mask), atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_lengths_on_the_host_are_read_where_the_sequences_are():
    if not HAS_TRITON:
        pytest.skip(fused.unavailable())
    lstm = nn.LSTM(4, 16, batch_first=True).cuda()
    seq, lengths = batch(5, 6, 4, seed=7)
    seq = seq.cuda()
    assert_close(last_state(lstm, seq, lengths, method="fused"), last_state(lstm, seq, lengths.cuda(), method="fused"))


# ------------------------------------------------------------------ where the kernels do not run
def test_a_reader_the_kernels_cannot_read_is_named():
    seq, lengths = torch.randn(2, 3, 4), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="method='fused' reads an nn.LSTM without projections, got GRU"):
        last_state(nn.GRU(4, 5, batch_first=True), seq, lengths, method="fused")
    with pytest.raises(ValueError, match="proj_size=2"):
        last_state(nn.LSTM(4, 5, proj_size=2, batch_first=True), seq, lengths, method="fused")
    with pytest.raises(ValueError, match="one-layer, one-directional reader, got num_layers=2"):
        last_state(nn.LSTM(4, 5, num_layers=2, batch_first=True), seq, lengths, method="fused")
    with pytest.raises(ValueError, match=r"method: expected one of .*'fused'.*got 'fast'"):
        last_state(nn.LSTM(4, 5, batch_first=True), seq, lengths, method="fast")
    with pytest.raises(ValueError, match="read must be one of"):
        PermutationSetEncoder(4, 5, read="cudnn")
    with pytest.raises(ValueError, match="read='fused' reads an LSTM, got rnn='gru'"):
        PermutationSetEncoder(4, 5, read="fused", rnn="gru")


def test_where_the_kernels_do_not_apply_the_read_is_auto_s(monkeypatch):
    # the CPU without Triton's interpreter, and more units than the kernels take: the same values
    # as the automatic read, no warning
    torch.manual_seed(0)
    seq, lengths = batch(4, 5, 3, seed=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lstm = nn.LSTM(3, 6, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(last_state(lstm, seq, lengths, method="fused"), last_state(lstm, seq, lengths, method="auto"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wide = nn.LSTM(3, fused_read.MAX_HIDDEN + 1, batch_first=True)
    assert not fused_read.applies(wide, seq)
    assert_close(last_state(wide, seq, lengths, method="fused"), last_state(wide, seq, lengths, method="grouped"))


def test_without_triton_the_padded_read_stands_in_warned_once(fdevice, monkeypatch):
    monkeypatch.setattr(fused_read, "unavailable", lambda: "Triton is not installed")
    monkeypatch.setattr(fused_read, "_warned", set())
    lstm = nn.LSTM(3, 8, batch_first=True).to(fdevice)
    seq, lengths = batch(4, 5, 3, seed=0)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    with pytest.warns(RuntimeWarning, match=r"the fused LSTM read needs Triton \(Triton is not installed\); "
                                            "the padded LSTM read computes the same values instead"):
        c = last_state(lstm, seq, lengths, method="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c2 = last_state(lstm, seq, lengths, method="fused")
    assert_close(c, last_state(lstm, seq, lengths, method="padded"))
    assert_close(c2, c)


class _Unbuildable:
    """A kernel that Triton cannot build: its launch raises as an out-of-resource error does."""
    __name__ = "lstm_forward_kernel"

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches += 1
            raise RuntimeError("out of resource: shared memory")
        return launch


def test_a_kernel_that_cannot_be_built_is_warned_once_and_not_tried_again(fdevice, monkeypatch):
    kernel = _Unbuildable()
    monkeypatch.setattr(fused_read, "_kernels", lambda: types.SimpleNamespace(lstm_forward_kernel=kernel))
    monkeypatch.setattr(fused_read, "_broken", {})
    monkeypatch.setattr(fused_read, "_warned", set())
    lstm = nn.LSTM(3, 8, batch_first=True).to(fdevice)
    seq, lengths = batch(4, 5, 3, seed=0)
    seq, lengths = seq.to(fdevice), lengths.to(fdevice)
    with pytest.warns(RuntimeWarning, match=r"the fused LSTM read: Triton could not build or run lstm_forward_kernel "
                                            r"for 16 hidden units \(RuntimeError: out of resource: shared memory\); "
                                            "the padded LSTM read computes the same values instead"):
        c = last_state(lstm, seq, lengths, method="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c2 = last_state(lstm, seq, lengths, method="fused")
    assert kernel.launches == 1                                  # not tried again
    assert_close(c, last_state(lstm, seq, lengths, method="padded"))
    assert_close(c2, c)
