import torch
from torch import nn
from torch.testing import assert_close

from setperm import PermutationSetEncoder, PermutationOptimizer, find_step_sizes, log_step_sizes, set_entropy_tracking


class Recorder:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


class TwoEncoders(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = PermutationSetEncoder(3, 4, cost_hidden=4, eta_init=0.5)
        self.b = PermutationOptimizer(3, cost_hidden=4, eta_init=2.0)


def test_finds_every_eta_and_logs_entropy():
    model = TwoEncoders()
    assert {k: round(float(v), 6) for k, v in find_step_sizes(model).items()} == {"a.permute": 0.5, "b": 2.0}
    set_entropy_tracking(model)
    model.b(torch.rand(2, 5, 3))
    rec = Recorder()
    values = log_step_sizes(rec, nn.DataParallel(model), step=7)
    tags = {t for t, _, _ in rec.calls}
    assert tags == {"eta/a.permute", "eta/b", "permutation_entropy/b"}
    assert all(s == 7 for _, _, s in rec.calls)
    assert 0 <= values["permutation_entropy/b"] <= float(torch.log(torch.tensor(5.0))) + 1e-6


def test_real_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    enc = PermutationSetEncoder(3, 4, cost_hidden=4)
    with SummaryWriter(str(tmp_path)) as w:
        log_step_sizes(w, enc, 0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["eta/permute"]
    assert_close(acc.Scalars("eta/permute")[0].value, 1.0)
