import contextlib
import functools
import importlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _interpreter_works() -> bool:
    # Triton 3.6's interpreter fails on a loop bound passed as an argument under NumPy 2; 3.7 - 3.9
    # run the kernels. Read from the installed metadata: Triton must not be imported yet.
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (3, 7)


# setperm.fused's Triton kernels are checked on the CPU in Triton's interpreter, which has to be
# chosen before Triton is first imported (importing torch_geometric imports it); with CUDA they run
# compiled on the GPU instead.
if ("triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
        and _interpreter_works()):
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    # The processes that tests start (``python -m integrations...``, benchmark probes) import this
    # checkout's package and scripts, as the test process does through ``pythonpath``, whatever
    # else is installed.
    parts = [str(REPO / "src"), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


def pytest_collection_modifyitems(config, items):
    # SETPERM_TESTS_FIRST="test_fused_read.py,test_fused.py": the tests of those files first, in that
    # order, the rest after them as collected (benchmarks/gpu_check.sh: a run stopped at its time limit
    # has run the GPU paths that are checked least)
    first = [name for name in os.environ.get("SETPERM_TESTS_FIRST", "").split(",") if name]
    if first:
        def rank(item) -> int:
            path = item.nodeid.split("::")[0]
            return next((i for i, name in enumerate(first) if path.endswith(name)), len(first))
        items.sort(key=rank)


def shared_data_root() -> Path:
    env = os.environ.get("SETPERM_DATA_ROOT")
    return Path(env) if env else (REPO.parent / "shared" / "data")


# Test folders whose tests run small tensors through whole models: a second intra-op thread only adds
# synchronisation, and where another process holds a core, OpenMP threads that wait for it make every
# small operation many times slower (the README's "Threads" section).
ONE_THREAD_FOLDERS = ("integrations", "benchmarks")


@pytest.fixture(autouse=True)
def _few_threads(request):
    # at most two threads elsewhere: the tests' speed does not depend on the core count, and tests
    # never oversubscribe the cores.
    prev = torch.get_num_threads()
    one = Path(request.node.path).parent.name in ONE_THREAD_FOLDERS
    torch.set_num_threads(1 if one else min(prev, 2))
    yield
    torch.set_num_threads(prev)


def _tf32_settings():
    """(object, attribute) of every switch that lets CUDA round float32 to TF32 (10-bit mantissa):
    the per-backend precisions where torch has them, else the older ``allow_tf32`` flags (the two
    forms must not be mixed)."""
    b = torch.backends
    if hasattr(b, "fp32_precision"):
        parts = [b, b.cuda.matmul, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None)]
        return [(part, "fp32_precision") for part in parts if hasattr(part, "fp32_precision")]
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


@pytest.fixture(autouse=True, scope="session")
def _ieee_float32_on_cuda():
    """On CUDA the tests compare float32 results with float32 tolerances, and cuDNN's LSTM runs in
    TF32 by default on Ampere and newer GPUs (rounding that two nearly equal inputs may straddle):
    full float32 for the session, the settings restored after it. Nothing changes without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    settings = _tf32_settings()
    saved = [getattr(obj, name) for obj, name in settings]
    for obj, name in settings:
        setattr(obj, name, "ieee" if name == "fp32_precision" else False)
    yield
    for (obj, name), value in zip(settings, saved):
        setattr(obj, name, value)


# Every device the core properties are checked on; CUDA is skipped where it is absent (CI is CPU-only).
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="CUDA is not available"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """A test parametrised over :data:`DEVICES`: ``torch.device('cpu')`` and, where present, CUDA."""
    return torch.device(request.param)


@pytest.fixture
def fdevice(device):
    """A device setperm's Triton kernels run on (setperm.fused, setperm.fused_read): CUDA, or the CPU
    under Triton's interpreter; skipped where Triton is missing or too old."""
    fused = importlib.import_module("setperm.fused")
    if fused.unavailable() is not None:
        pytest.skip(fused.unavailable())
    if device.type == "cpu" and not fused.interpreted():
        pytest.skip("the CPU runs the Triton kernels only in Triton's interpreter (TRITON_INTERPRET=1)")
    return device


@pytest.fixture
def build_failure():
    """``message -> exception``: what ``torch.compile`` raises when its backend cannot build a
    kernel, as this torch raises it (inductor's own error where it has one, else dynamo's)."""
    def make(message: str) -> Exception:
        inductor = importlib.import_module("torch._inductor.exc")
        if hasattr(inductor, "InductorError"):
            return inductor.InductorError(RuntimeError(message), None)
        return importlib.import_module("torch._dynamo.exc").BackendCompilerFailed(lambda: None, RuntimeError(message))
    return make


@pytest.fixture
def fresh_compiler():
    """Dynamo's caches emptied before a test that compiles one of setperm's functions in many
    specialisations (dtypes, channels, masks, the layouts of incoming gradients): the suite's earlier
    tests compile the same functions for their own, and past dynamo's recompile limit a compiled
    kernel runs plain operations instead (warned; an error in the tests, ``pyproject.toml``), which
    would compare the plain operations with themselves."""
    from benchmarks.gpu import reset_compiler

    reset_compiler()


@pytest.fixture
def recompile_limit_error():
    """What a ``torch.compile(fullgraph=True)`` function raises past dynamo's recompile limit, as
    this torch raises it (the class differs between releases): caught from a real one, a second
    dtype past a limit of one (the eager backend: no code is generated)."""
    import torch._dynamo
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"   # (its older name)

    def add_one(t):
        return t + 1

    try:
        compiled = torch.compile(add_one, fullgraph=True, backend="eager")
    except RuntimeError as err:         # torch 2.0 on Python 3.11 and newer refuses at once
        pytest.skip(f"torch.compile does not run here: {err}")
    torch._dynamo.reset()
    try:
        with config.patch(**{limit: 1}):
            compiled(torch.zeros(2))
            compiled(torch.zeros(2, dtype=torch.float64))
    except Exception as err:            # (dynamo's errors are not all RuntimeErrors)
        return err
    finally:
        torch._dynamo.reset()
    pytest.fail(f"no error past a {limit} of one")


@functools.lru_cache(maxsize=None)
def _torch_compile_failure() -> Optional[str]:
    """Why ``torch.compile`` cannot be set up here (None where it can): torch 2.0 on Python 3.11 and
    newer refuses at once; under a locale whose encoding is ASCII (the C locale without Python's
    UTF-8 coercion) torch's inductor, which every backend imports, cannot read its own templates.
    Checked once: a failed import of inductor leaves it half-imported for the rest of the process."""
    from setperm.pairwise import build_error_cause
    try:
        torch.compile(lambda t: t)
    except Exception as err:             # whatever torch raises: it is reported, not judged
        return f"{type(err).__name__}: {build_error_cause(err)}"
    return None


def _skip_where(reason: Optional[str], what: str) -> None:
    """Skips the test with ``what: reason`` where a probe gave a reason (None: it runs)."""
    if reason is not None:
        pytest.skip(f"{what}: {reason}")


@pytest.fixture
def torch_compile_runs():
    """Skips a test of compiled kernels where ``torch.compile`` cannot be set up in this environment."""
    _skip_where(_torch_compile_failure(), "torch.compile does not run here")


def _inductor_probe(t):
    return torch.sin(t) * 2 + 1


@functools.lru_cache(maxsize=None)
def _inductor_cpu_failure() -> Optional[str]:
    """Why torch's inductor cannot build and run a C++ kernel on the CPU in this environment (None
    where it can): checked once, on a function of its own. Where it cannot, the cause is the
    environment, not setperm: no C++ compiler, a locale whose encoding cannot read inductor's
    templates, or a torch whose link line breaks on a library folder with a space."""
    from setperm.pairwise import build_error_cause, library_dir_with_space
    try:
        out = torch.compile(_inductor_probe, fullgraph=True)(torch.ones(3))
    except Exception as err:             # whatever inductor raises: it is reported, not judged
        spaced = library_dir_with_space()
        return build_error_cause(err) + (f" (a library folder with a space: {spaced!r})" if spaced else "")
    assert torch.allclose(out, _inductor_probe(torch.ones(3)))
    return None


@functools.lru_cache(maxsize=None)
def _cpu_autocast_lstm_failure() -> Optional[str]:
    """Why torch's own ``nn.LSTM`` cannot run under bfloat16 autocast on this CPU (None where it can):
    torch runs it through oneDNN, which has no low-precision LSTM on some x86 CPUs (AVX2 without
    AVX-512: "could not create a primitive descriptor for the LSTM forward propagation primitive").
    The cause is the platform, not setperm: setperm's readers are torch's LSTM."""
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3, requires_grad=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(x)[0].float().sum().backward()
    except RuntimeError as err:          # whatever torch raises: it is reported, not judged
        return str(err).splitlines()[0]
    return None


@pytest.fixture
def cpu_autocast_lstm_runs():
    """Skips a test of an LSTM read under CPU autocast where torch's own LSTM cannot run so here."""
    _skip_where(_cpu_autocast_lstm_failure(), "torch's nn.LSTM does not run under bfloat16 autocast on this CPU")


@pytest.fixture
def inductor_builds_on_cpu(torch_compile_runs):
    """Skips a test that compiles CPU kernels with inductor where inductor cannot build one in this
    environment (the reason is in the skip); CI machines can."""
    _skip_where(_inductor_cpu_failure(), "torch's inductor cannot build a CPU kernel here")


@pytest.fixture
def on_meta():
    """``with on_meta():`` around work on the ``meta`` device: skips the test, naming the operator,
    where this torch's meta backend has no kernel for one (torch 2.0 - 2.2 lack one the layer uses);
    any other error fails the test."""
    @contextlib.contextmanager
    def enter():
        try:
            yield
        except NotImplementedError as err:
            # (the message differs between torch releases)
            missing = (re.search(r"Could not run '([^']+)' with arguments from the 'Meta' backend", str(err))
                       or re.search(r"(\S+): attempted to run this operator with Meta tensors", str(err)))
            if missing is None:
                raise
            pytest.skip(f"the meta backend of torch {torch.__version__} has no kernel for {missing[1]}")
    return enter


@pytest.fixture
def flop_counter():
    """``torch.utils.flop_counter``, or a skip with the reason where this torch cannot count the
    layer's FLOPs on ``meta`` (``benchmarks.flops.unavailable``: torch 2.0 - 2.3)."""
    from benchmarks.flops import unavailable

    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    return importlib.import_module("torch.utils.flop_counter")


@pytest.fixture
def without_cuda_sync():
    """``without_cuda_sync(forward)``: ``forward()`` and the backward of its output's sum under
    ``torch.cuda.set_sync_debug_mode("error")``. A synchronisation fails the test naming the phase
    and, in backward, the autograd node that had started when it happened (a pre-hook on every node
    of the graph records each as it starts), so a GPU run says where the host waited."""
    def check(forward):
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            try:
                out = forward()
            except RuntimeError as err:
                if "synchroniz" not in str(err):
                    raise
                pytest.fail(f"forward synchronises with the host: {err}")
            loss = out.sum()
            started = []
            nodes, stack = set(), [loss.grad_fn]
            while stack:
                node = stack.pop()
                if node is None or node in nodes:
                    continue
                nodes.add(node)
                node.register_prehook(lambda grads, name=node.name(): started.append(name))
                stack.extend(nxt for nxt, _ in node.next_functions)
            try:
                loss.backward()
            except RuntimeError as err:
                if "synchroniz" not in str(err):
                    raise
                pytest.fail(f"backward synchronises with the host in {started[-1] if started else 'its start'} "
                            f"(the nodes started before it, last first: {started[-2:-7:-1]}): {err}")
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    return check


# ------------------------------------------------------------------ the path CUDA takes, on the CPU
def _tensors(tree) -> list:
    return [t for t in torch.utils._pytree.tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _names_the_host(args, kwargs) -> bool:
    """Whether a ``to`` / factory call names the host the way code that means it does: the string "cpu"."""
    return any(isinstance(a, str) and a == "cpu" for a in args) or kwargs.get("device") == "cpu"


class HostWaits:
    """Runs on the CPU what CUDA runs, and refuses, with the operation and its cause, everything
    that makes the host wait for a CUDA device there: reading a device value (``item``, ``bool``,
    ``int``, ``tolist``, ``numpy``, ``cpu``, ``.to("cpu")``, a copy into a host tensor), operators
    whose output size depends on the values (``nonzero``, boolean indexing, ``masked_select``,
    ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``), ``equal``, a packed
    sequence built from device lengths, and host data made into a device tensor with a blocking copy
    (``torch.tensor(..., device=)``, ``new_tensor``, ``host.to(device)`` without ``non_blocking``).

    On the CPU every tensor is a host tensor, so the test names the ones that are host tensors on
    CUDA too (``host=``: set sizes the caller keeps on the host); tensors computed from host tensors
    alone, made by ``torch.tensor`` / ``torch.as_tensor`` without a device, or moved with
    ``.to("cpu")`` are host tensors as well, and reading them is allowed. What cannot be told apart on
    the CPU (a factory call with ``device="cpu"`` given as a ``torch.device``) is taken as the device."""

    # operator -> why it waits, whatever its arguments
    WAITING = dict.fromkeys(("nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                             "bincount"), "sizes its output by the device values")
    WAITING.update(_local_scalar_dense="reads a device value on the host", equal="answers on the host")

    def __init__(self, host=()):
        from torch.utils._python_dispatch import TorchDispatchMode
        self._kept = []                   # the host tensors, alive while the mode is (ids stay unique)
        self._host = set()
        self._paused = False
        self.calls = {}                   # exempted function name -> calls (see exempt)
        for t in host:
            self.mark_host(t)
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if outer._paused:
                    return func(*args, **kwargs)
                inputs = _tensors((args, kwargs))
                on_host = bool(inputs) and all(outer.is_host(t) for t in inputs)
                if not on_host:
                    outer._check(func, args, kwargs)
                out = func(*args, **kwargs)
                if on_host:
                    for t in _tensors(out):
                        outer.mark_host(t)
                elif func.overloadpacket is torch.ops.aten._pack_padded_sequence:
                    outer.mark_host(out[1])       # its batch sizes: a host tensor on every device
                return out

        self.mode = Mode()

    def exempt(self, fn):
        """``fn`` run without the checks, its calls counted in ``calls[fn.__name__]``: a wait the test
        allows (a loss check by design, a library's own check, a kernel launcher that, in Triton's
        interpreter on the CPU, reads its arguments on the host as a GPU launch would not)."""
        def unchecked(*args, **kwargs):
            self.calls[fn.__name__] = self.calls.get(fn.__name__, 0) + 1
            self._paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._paused = False
        return unchecked

    def mark_host(self, t):
        if id(t) not in self._host:
            self._host.add(id(t))
            self._kept.append(t)
        return t

    def is_host(self, t) -> bool:
        return id(t) in self._host

    def _check(self, func, args, kwargs):
        aten, name = torch.ops.aten, func.overloadpacket.__name__
        cause = None
        if name in self.WAITING:
            cause = self.WAITING[name]
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
                cause = "indexes with a boolean device mask (its size depends on the values)"
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            cause = "repeats by device counts without output_size"
        elif func.overloadpacket is aten._pack_padded_sequence and not self.is_host(args[1]):
            cause = "packs a sequence by device lengths (copied to the host)"
        elif func.overloadpacket is aten.copy_ and self.is_host(args[0]):
            cause = "copies a device tensor into a host tensor"
        if cause is not None:
            raise AssertionError(f"{func} {cause}: on CUDA the host would wait for the device")

    def patches(self):
        """(object, name, replacement) of the Python-level reads and copies the dispatcher does not see."""
        outer, T = self, torch.Tensor

        def read(name, real):
            def method(t, *args, **kwargs):
                if not outer._paused and not outer.is_host(t):
                    raise AssertionError(f"Tensor.{name} reads a device tensor on the host: on CUDA the host "
                                         "would wait for the device")
                return real(t, *args, **kwargs)
            return method

        real_to = T.to

        def to(t, *args, **kwargs):
            if outer._paused:
                return real_to(t, *args, **kwargs)
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is not None and _names_the_host(args, kwargs):
                if not outer.is_host(t):
                    raise AssertionError(f"Tensor.to({args}, {kwargs}) copies a device tensor to the host: "
                                         "on CUDA the host would wait for the device")
                return outer.mark_host(real_to(t, *args, **kwargs))
            if device is not None and outer.is_host(t) and not non_blocking:
                raise AssertionError(f"Tensor.to({args}, {kwargs}) copies a host tensor to the device with "
                                     "a blocking copy: on CUDA the host would wait (non_blocking=True does not)")
            return real_to(t, *args, **kwargs)

        def factory(name, real, always_device=False):
            def make(*args, **kwargs):
                if outer._paused:
                    return real(*args, **kwargs)
                device = kwargs.get("device")
                if (always_device or device is not None) and device != "cpu":
                    raise AssertionError(f"{name}(..., device={device!r}) makes host data a device tensor with "
                                         "a blocking copy: on CUDA the host would wait for the device")
                data = args[0] if args else kwargs.get("data")
                if isinstance(data, torch.Tensor) and not outer.is_host(data):
                    if device == "cpu":
                        raise AssertionError(f"{name}(<device tensor>, device='cpu') copies a device tensor to the "
                                             "host: on CUDA the host would wait for the device")
                    return real(*args, **kwargs)          # a device tensor stays one
                return outer.mark_host(real(*args, **kwargs))
            return make

        return ([(T, name, read(name, getattr(T, name))) for name in ("tolist", "numpy", "cpu")]
                + [(T, "to", to), (T, "new_tensor", factory("Tensor.new_tensor", T.new_tensor, always_device=True)),
                   (torch, "tensor", factory("torch.tensor", torch.tensor)),
                   (torch, "as_tensor", factory("torch.as_tensor", torch.as_tensor))])


@pytest.fixture
def device_path(monkeypatch):
    """``with device_path(host=(lengths,)):`` runs setperm on the CPU as it runs on CUDA (every
    ``host_decisions`` answers False) and fails on anything there that makes the host wait for the
    device (:class:`HostWaits`; ``host=``: the tensors that live on the host on CUDA too;
    ``exempt=((obj, "name"), ...)``: attributes run without the checks, their calls counted in the
    yielded ``HostWaits.calls``). ``device_path(refuse=False)`` takes the path without the checks."""
    @contextlib.contextmanager
    def enter(host=(), refuse=True, exempt=()):
        # (the host benchmark's context, which takes the same path)
        from benchmarks.host import host_decisions_as_on_cuda

        with host_decisions_as_on_cuda(), monkeypatch.context() as m:
            if not refuse:
                yield None
                return
            waits = HostWaits(host)
            for obj, name, replacement in waits.patches():
                m.setattr(obj, name, replacement)
            for obj, name in exempt:
                m.setattr(obj, name, waits.exempt(getattr(obj, name)))
            with waits.mode:
                yield waits
    return enter
