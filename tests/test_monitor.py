import pytest
import torch
from torch import nn
from torch.testing import assert_close

from setperm import LinAssign, PermutationMonitor, PermutationOptimization, PermutationSetEncoder
from setperm.functional import permutation_entropy


class Recorder:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


class ThreeOptimizers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = PermutationSetEncoder(3, 4, PermutationOptimization(3, cost_hidden=4, steps=3, eta_init=0.5))
        self.b = PermutationOptimization(3, cost_hidden=4, steps=6, eta_init=2.0)
        self.c = LinAssign(3, num_positions=5)          # no eta, but an entropy


def test_step_sizes_read_eta_only():
    model = ThreeOptimizers()
    with PermutationMonitor(model) as monitor:
        assert {k: round(v, 6) for k, v in monitor.step_sizes().items()} == {"a.po": 0.5, "b": 2.0}
    monitor = PermutationMonitor(nn.DataParallel(model))       # no forward needed, the wrapper unwrapped
    assert monitor.step_sizes() == pytest.approx({"a.po": 0.5, "b": 2.0})
    assert all(isinstance(v, float) for v in monitor.step_sizes().values())


def test_monitor_records_the_entropy_of_each_forward():
    torch.manual_seed(0)
    model = ThreeOptimizers()
    x = torch.rand(2, 5, 3)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    monitor = PermutationMonitor(nn.DataParallel(model))      # the wrapper is unwrapped, names are module paths
    assert monitor.values() == pytest.approx({"eta/a.po": 0.5, "eta/b": 2.0})   # nothing recorded yet
    model.a(x, mask=mask)                                      # the encoder's PO fires its hook
    P_b = model.b(x, lengths=torch.tensor([3, 5]))
    P_c = model.c(x, key_padding_mask=~mask)
    _, P_a = model.a(x, mask=mask, return_permutation=True)
    values = monitor.values()
    assert set(values) == {"eta/a.po", "eta/b", "permutation_entropy/a.po", "permutation_entropy/b",
                           "permutation_entropy/c"}
    lengths_mask = torch.arange(5) < torch.tensor([3, 5])[:, None]
    with torch.no_grad():
        expected = {"a.po": permutation_entropy(P_a, mask).mean(),
                    "b": permutation_entropy(P_b, lengths_mask).mean(), "c": permutation_entropy(P_c, mask).mean()}
    for name, ent in expected.items():
        assert values[f"permutation_entropy/{name}"] == pytest.approx(float(ent), abs=1e-6)
        assert 0 <= values[f"permutation_entropy/{name}"] <= float(torch.log(torch.tensor(5.0))) + 1e-6
    # the last forward wins
    model.b(torch.rand(4, 6, 3), return_steps=True)
    assert monitor.entropies()["b"] != pytest.approx(float(expected["b"]))
    rec = Recorder()
    assert monitor.log(rec, step=3) == monitor.values()
    assert {t for t, _, _ in rec.calls} == set(values) and all(s == 3 for _, _, s in rec.calls)
    assert monitor.log(None, step=4) == monitor.values()


def test_monitor_removed_records_nothing():
    model = ThreeOptimizers()
    x = torch.rand(2, 5, 3)
    with PermutationMonitor(model) as monitor:
        model.b(x)
        assert "permutation_entropy/b" in monitor.values()
    assert monitor.values() == pytest.approx({"eta/a.po": 0.5, "eta/b": 2.0})
    model.b(x)
    model.a(x)
    assert monitor.entropies() == {}
    assert all(not m._forward_hooks for m in model.modules())     # no hook left behind
    monitor.remove()                                               # idempotent


def test_monitor_empty_batch_and_no_grad_effect():
    enc = PermutationSetEncoder(3, 4, PermutationOptimization(3, cost_hidden=4, steps=3))
    monitor = PermutationMonitor(enc)
    enc(torch.rand(0, 4, 3))
    assert monitor.entropies() == {}
    x = torch.rand(2, 4, 3, requires_grad=True)
    h = enc(x)
    h.sum().backward()                                             # the hook's reduction is outside autograd
    assert x.grad is not None and monitor.entropies()["po"] >= 0
    assert PermutationMonitor(PermutationOptimization(3, cost_hidden=4, steps=6)).values() == {"eta/permutation": 1.0}


def test_real_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    enc = PermutationSetEncoder(3, 4, PermutationOptimization(3, cost_hidden=4, steps=3))
    monitor = PermutationMonitor(enc)
    enc(torch.rand(2, 4, 3))
    with SummaryWriter(str(tmp_path)) as w:
        monitor.log(w, 0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eta/po", "permutation_entropy/po"]
    assert_close(acc.Scalars("eta/po")[0].value, 1.0)


def test_compiled_model_logs_the_plain_tags(torch_compile_runs):
    """torch.compile's wrapper is unwrapped like DataParallel: a compiled model (or a compiled
    submodule) logs under the tags of the plain one, and its forward still records."""
    model = ThreeOptimizers()
    plain = PermutationMonitor(model).step_sizes()
    assert PermutationMonitor(torch.compile(model, backend="eager")).step_sizes() == plain
    assert PermutationMonitor(torch.compile(nn.DataParallel(model), backend="eager")).step_sizes() == plain
    model.b = torch.compile(model.b, backend="eager")
    monitor = PermutationMonitor(model)
    assert monitor.step_sizes() == plain
    model.b(torch.rand(2, 5, 3))
    assert set(monitor.entropies()) == {"b"}
    monitor.remove()
    po = PermutationOptimization(3, cost_hidden=4, steps=2)
    assert set(PermutationMonitor(torch.compile(po, backend="eager")).values()) == {"eta/permutation"}


@pytest.mark.parametrize("model", [None, lambda x: x, {"po": PermutationOptimization(3)}])
def test_monitor_of_something_that_is_no_module_is_refused_by_name(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        PermutationMonitor(model)


def test_monitor_averages_over_non_empty_sets_and_forgets_no_value_on_empty_ones():
    """An empty set has no rows: it is left out of the batch mean (as 0 it would read as a hard
    permutation), and a forward whose sets are all empty keeps the earlier value."""
    torch.manual_seed(0)
    po = PermutationOptimization(3, cost_hidden=4, steps=3)
    monitor = PermutationMonitor(po)
    x = torch.rand(3, 5, 3)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, True, True, False, False]])
    P = po(x, mask=mask)
    with torch.no_grad():
        expected = permutation_entropy(P, mask)[[0, 2]].mean()
    assert expected > 0.1
    assert monitor.entropies()["permutation"] == pytest.approx(float(expected), abs=1e-6)
    po(x, mask=torch.zeros(3, 5, dtype=torch.bool))                # only empty sets: nothing recorded
    po(torch.rand(2, 0, 3))                                         # N = 0
    assert monitor.entropies()["permutation"] == pytest.approx(float(expected), abs=1e-6)
    enc = PermutationSetEncoder(3, 4, PermutationOptimization(3, cost_hidden=4, steps=3))
    with PermutationMonitor(enc) as m:
        enc(torch.rand(2, 0, 3))                                    # the encoder's N = 0 path
        assert m.entropies() == {}
