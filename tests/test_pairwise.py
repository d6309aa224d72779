import sysconfig
import warnings

import pytest
import torch
import torch._dynamo
from torch.testing import assert_close

import setperm.pairwise as pairwise_mod
from setperm import PermutationOptimization, PermutationSetEncoder
from setperm.pairwise import pairwise_two_layer


def literal(a, c, w):
    """The (B, N, N, H) hidden activations built explicitly."""
    return torch.relu(a[:, :, None] + c[:, None]) @ w.t()


def inputs(seed, B=3, N=5, H=3, K=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
                 for shape in ((B, N, H), (B, N, H), (K, H)))


# 7: row blocks of one set; 160: two whole sets (5*5*3 = 75 elements each) per chunk, last one
# partial; 1 << 20: everything in one chunk.
@pytest.mark.parametrize("chunk", [7, 160, 1 << 20])
def test_chunked_gradcheck_and_value(monkeypatch, chunk):
    monkeypatch.setattr(pairwise_mod, "_CHUNK_ELEMENTS", chunk)
    a, c, w = inputs(3)
    assert torch.autograd.gradcheck(pairwise_two_layer, (a, c, w))
    assert torch.autograd.gradgradcheck(pairwise_two_layer, (a, c, w))
    assert_close(pairwise_two_layer(a, c, w), literal(a, c, w), rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    a, c, w = inputs(0)
    with pytest.raises(ValueError, match="kernel"):
        pairwise_two_layer(a, c, w, kernel="triton")
    with pytest.raises(ValueError, match=r"a and c .* \(3, 5, 3\) and \(3, 4, 3\)"):
        pairwise_two_layer(a, c[:, :4], w)
    with pytest.raises(ValueError, match=r"w2 must have shape \(K, 3\), got \(2, 4\)"):
        pairwise_two_layer(a, c, torch.zeros(2, 4, dtype=a.dtype))


def test_compile_failure_is_a_clear_error(monkeypatch, build_failure):
    def broken(*args):
        raise build_failure("no C++ compiler")

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: broken)
    a, c, w = inputs(0)
    with pytest.raises(RuntimeError, match="kernel='chunked'"):
        pairwise_two_layer(a, c, w, kernel="compiled")


def test_a_library_folder_with_a_space_is_named_as_the_likely_cause(monkeypatch, build_failure):
    # inductor's CPU link line names torch's and Python's library folders, unquoted in some releases
    monkeypatch.setattr(torch, "__file__", "/opt/env/site-packages/torch/__init__.py")
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: "/usr/lib" if name == "LIBDIR" else None)
    assert pairwise_mod.library_dir_with_space() is None
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: "/opt/Python 3/lib" if name == "LIBDIR" else None)
    assert pairwise_mod.library_dir_with_space() == "/opt/Python 3/lib"
    monkeypatch.setattr(torch, "__file__", "/home/a user/env/site-packages/torch/__init__.py")
    assert pairwise_mod.library_dir_with_space() == "/home/a user/env/site-packages/torch/lib"

    def broken(*args):
        raise build_failure("C++ compile error")

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: broken)
    a, c, w = inputs(0)
    with pytest.raises(RuntimeError, match=r"C\+\+ compile error; the likely reason: '/home/a user/env/.*/torch/lib' "
                                           "holds a space"):
        pairwise_two_layer(a, c, w, kernel="compiled")


# The compiled kernel needs torch.compile on this Python and inductor's C++ toolchain on CPU; CI
# machines have both.
needs_compiler = pytest.mark.usefixtures("inductor_builds_on_cpu")


@needs_compiler
def test_compiled_equals_chunked_with_exact_gradients():
    a, c, w = inputs(4, B=2, N=6, H=4, K=2)
    assert_close(pairwise_two_layer(a, c, w, kernel="compiled"), literal(a, c, w), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: pairwise_two_layer(*t, kernel="compiled"), (a, c, w))
    # double backward runs the recorded chunked contractions
    assert torch.autograd.gradgradcheck(lambda *t: pairwise_two_layer(*t, kernel="compiled"), (a, c, w))


@needs_compiler
def test_compiled_encoder_matches_chunked_on_variable_sizes():
    """Masked, variable-size float32 sets (two batch shapes, so the dynamic-shape recompilation
    is exercised): same output and parameter gradients as the default kernel."""
    torch.manual_seed(5)
    ref = PermutationSetEncoder(4, 8, PermutationOptimization(4, cost_hidden=16, steps=2))
    fast = PermutationSetEncoder(4, 8, PermutationOptimization(4, cost_hidden=16, steps=2, kernel="compiled"))
    fast.load_state_dict(ref.state_dict())
    for N, lengths in ((7, [7, 3, 0]), (5, [2, 5, 4])):
        x = torch.randn(3, N, 4)
        lengths = torch.tensor(lengths)
        outs = []
        for model in (ref, fast):
            model.zero_grad()
            h = model(x, lengths=lengths)
            h.pow(2).sum().backward()
            outs.append((h, [p.grad.clone() for p in model.parameters()]))
        assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
        for g_fast, g_ref in zip(outs[1][1], outs[0][1]):
            assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


@needs_compiler
def test_compiled_lattice_optimizer_matches_chunked():
    torch.manual_seed(6)
    ref = PermutationOptimization(5, cost_hidden=8, steps=2, grid=(2, 3), permutation="po-la")
    fast = PermutationOptimization(5, cost_hidden=8, steps=2, grid=(2, 3), permutation="po-la", kernel="compiled")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5)
    assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-6)


def test_recompile_limit_falls_back_to_chunked(monkeypatch, recompile_limit_error):
    """Past dynamo's recompile limit the same values come from the chunked kernel, with a warning."""
    def refuse(*args):
        raise recompile_limit_error

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: refuse)
    a, c, w = inputs(1)
    with pytest.warns(RuntimeWarning, match="recompile limit"):
        out = pairwise_two_layer(a, c, w, kernel="compiled")
        grads = torch.autograd.grad(out.pow(2).sum(), (a, c, w))
    ref = literal(a, c, w)
    assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(ref.pow(2).sum(), (a, c, w))):
        assert_close(g, r, rtol=1e-10, atol=1e-12)


@needs_compiler
def test_the_real_recompile_limit_falls_back_to_chunked():
    """dynamo's own limit, as this torch reports it: a second dtype past a limit of one."""
    torch._dynamo.reset()
    try:
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"   # (its older name)
        with config.patch(**{limit: 1}):
            for dtype, warned in ((torch.float32, False), (torch.float64, True)):
                a, c, w = inputs(2, dtype=dtype)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = pairwise_two_layer(a, c, w, kernel="compiled")
                assert any("recompile limit" in str(m.message) for m in caught) == warned
                assert_close(out, literal(a, c, w), rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


@needs_compiler
def test_compiled_kernel_serves_many_shapes_without_recompiling_per_shape():
    """Set sizes, batch sizes, hidden widths and channel counts of several models in one process
    (more than dynamo's default recompile limit of 8 static shapes)."""
    with warnings.catch_warnings():
        # no recompile-limit fallback (only setperm's warning: torch's own may warn about its internals)
        warnings.filterwarnings("error", message=".*recompile limit", category=RuntimeWarning)
        for i, (B, N, H, K) in enumerate([(2, 5, 3, 2), (3, 7, 4, 2), (2, 9, 16, 2), (4, 4, 8, 2), (2, 11, 5, 2),
                                          (3, 6, 12, 2), (2, 13, 7, 2), (5, 3, 9, 2), (2, 8, 6, 3), (3, 10, 10, 2)]):
            a, c, w = inputs(10 + i, B=B, N=N, H=H, K=K, dtype=torch.float32)
            w = torch.nn.Parameter(w.detach())     # as in a module: dynamo treats parameters specially
            out = pairwise_two_layer(a, c, w, kernel="compiled")
            assert_close(out, literal(a, c, w), rtol=1e-5, atol=1e-5)
            out.sum().backward()


def projection_inputs(seed, B=3, N=5, D=2, H=4, K=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
                 for shape in ((B, N, D), (H, D), (H, D), (B, 1, H), (K, H)))


def from_elements(x, w_a, w_b, bias, w2, kernel="chunked", recompute=True):
    a, c = pairwise_mod.element_projections(x, w_a, w_b, bias)
    return pairwise_two_layer(a, c, w2, kernel, projections=(x, w_a, w_b, bias) if recompute else None)


def check_recomputed_projections(kernel):
    args = projection_inputs(5)
    f = lambda *t: from_elements(*t, kernel=kernel)            # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    assert_close(f(*args), from_elements(*args, recompute=False), rtol=1e-12, atol=1e-12)


def test_recomputed_projections_give_exact_gradients():
    """With ``projections`` backward recomputes a and c from the elements: first and second
    derivatives through x, the first layer's weights and bias, and w2 are exact."""
    check_recomputed_projections("chunked")


@needs_compiler
def test_recomputed_projections_give_exact_gradients_with_the_compiled_kernel():
    check_recomputed_projections("compiled")


def test_with_projections_backward_keeps_the_elements_not_the_projections():
    """What autograd keeps for backward, counted by saved-tensor hooks: no (B, N, H) projection
    once the pairwise function recomputes them, where it kept two before."""
    B, N, D, H = 3, 5, 2, 7
    x, w_a, w_b, bias, w2 = projection_inputs(6, B=B, N=N, D=D, H=H)

    def saved_shapes(recompute):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            from_elements(x, w_a, w_b, bias, w2, recompute=recompute)
        return shapes

    assert saved_shapes(recompute=False).count((B, N, H)) == 2
    assert (B, N, H) not in saved_shapes(recompute=True)


def test_recomputed_projections_under_autocast_give_the_kept_ones_gradients():
    """Backward runs without autocast; the projections are computed without it in forward too, so
    the recomputed a and c are the forward's, bit for bit, and so are the gradients."""
    args = [t.detach().float().requires_grad_(True) for t in projection_inputs(7, N=9, H=16)]
    grads = []
    for recompute in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = from_elements(*args, recompute=recompute)
        grads.append(torch.autograd.grad(out.float().pow(2).sum(), args))
    for got, want in zip(*grads):
        assert_close(got, want, rtol=1e-6, atol=1e-7)   # (bfloat16 projections in one of them: ~1e-2 off)
