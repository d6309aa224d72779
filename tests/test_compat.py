"""The torch-version shims answer as the newest torch's API does, on whichever torch runs them."""
import contextlib
import warnings

import pytest
import torch

import setperm.pairwise as pairwise_mod
from setperm import _compat


def test_is_compiling_only_while_torch_compile_traces(torch_compile_runs):
    seen = []

    def f(t):
        seen.append(_compat.is_compiling())
        return t + 1

    assert not _compat.is_compiling()
    torch._dynamo.reset()
    try:
        torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    finally:
        torch._dynamo.reset()
    assert seen == [True]
    f(torch.zeros(2))
    assert seen == [True, False]


def test_default_device_follows_the_device_context():
    assert _compat.default_device() == torch.device("cpu")
    with torch.device("meta"):
        assert _compat.default_device() == torch.device("meta")


def test_autocast_enabled_per_device_type():
    assert not _compat.autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _compat.autocast_enabled("cpu")
        assert not _compat.autocast_enabled("cuda")
    assert not _compat.autocast_enabled("cpu")
    assert not _compat.autocast_enabled("meta")          # a device type autocast does not know


def test_autocast_off_where_autocast_is_on_and_no_context_elsewhere():
    a = torch.randn(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with _compat.autocast_off("cpu"):
            assert (a @ a).dtype == torch.float32
        with _compat.autocast_off("cuda"):               # another device type's: the CPU's stays on
            assert (a @ a).dtype == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16
    assert isinstance(_compat.autocast_off("cpu"), contextlib.nullcontext)
    with pytest.raises(RuntimeError):
        torch.autocast("meta", enabled=False)            # what autocast_off does not enter
    with _compat.autocast_off("meta"):
        assert (a.to("meta") @ a.to("meta")).dtype == torch.float32


def test_the_error_classes(recompile_limit_error):
    import torch._dynamo
    exc = torch._dynamo.exc
    errors = _compat.compiler_errors()
    assert exc.BackendCompilerFailed in errors and all(issubclass(e, Exception) for e in errors)
    assert _compat.hit_recompile_limit(recompile_limit_error)
    assert not _compat.hit_recompile_limit(RuntimeError("cache_size_limit reached"))
    assert not _compat.hit_recompile_limit(exc.Unsupported("a graph break"))


def test_a_torch_compile_that_refuses_this_python_is_a_failed_build(monkeypatch):
    """torch.compile itself may refuse (torch 2.0 on Python 3.11): "auto" falls back once with the
    reason, an explicit "compiled" raises a clear error."""
    def refuse(fn):
        raise RuntimeError("Python 3.99+ not yet supported for torch.compile")

    monkeypatch.setattr(pairwise_mod, "_compiled", refuse)
    monkeypatch.setattr(pairwise_mod, "_auto_fallback", {})
    g = torch.Generator().manual_seed(0)
    a, c, w2 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 4, 3), (2, 4, 3), (1, 3)))
    with pytest.raises(RuntimeError, match="could not be compiled .*Cause: Python 3.99"):
        pairwise_mod.pairwise_two_layer(a, c, w2, kernel="compiled")
    with pytest.warns(RuntimeWarning, match="cannot be built on cpu .*Python 3.99"):
        out = pairwise_mod._call_compiled(pairwise_mod._fused_forward, a, c, w2, fall_back=True)
    assert out is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # once per device type
        assert pairwise_mod._call_compiled(pairwise_mod._fused_forward, a, c, w2, fall_back=True) is None


def test_every_function_with_setup_context_keeps_its_forward_signature():
    """``autograd.Function.apply`` binds the arguments to ``forward``'s signature at every call of a
    Function with ``setup_context`` (torch 2.13, for one); each of the package's keeps that
    signature (``signature_kept``), the very one inspect would work out, so none is recomputed."""
    import importlib
    import inspect
    import pkgutil
    import types

    import setperm

    found = []
    for info in pkgutil.iter_modules(setperm.__path__):
        if info.name in ("_fused_kernels", "_fused_read_kernels", "pyg"):
            continue                                          # need Triton / PyG; no autograd.Function
        module = importlib.import_module(f"setperm.{info.name}")
        for cls in vars(module).values():
            if (isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls.__module__ == module.__name__
                    and "setup_context" in vars(cls)):
                found.append(cls.__name__)
                kept = vars(cls.forward).get("__signature__")
                assert kept is not None, cls
                fn = cls.forward
                fresh = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                fresh.__kwdefaults__, fresh.__annotations__ = fn.__kwdefaults__, fn.__annotations__
                assert "__signature__" not in vars(fresh) and kept == inspect.signature(fresh), cls
    assert {"_Sinkhorn", "_PairwiseTwoLayer", "_FusedOptimize", "_FusedLSTMRead"} <= set(found), found
