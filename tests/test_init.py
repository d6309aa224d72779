"""Construction of every module: reset_parameters() reproduces a fresh module under the same seed,
device= / dtype= factory kwargs, the paper's initialisation (appendix F), and an extra_repr that
shows every hyper-parameter."""
import math

import pytest
import torch
from torch import nn

from setperm import LinAssign, PairwiseCost, PermutationOptimization, PermutationSetEncoder
from setperm.assign import LinearAssignmentLogits

BUILDERS = {
    "PairwiseCost": lambda **kw: PairwiseCost(3, (5, 4), channels=2, **kw),
    "LinearAssignmentLogits": lambda **kw: LinearAssignmentLogits(3, 7, clip=10.0, **kw),
    "PermutationOptimization po-u": lambda **kw: PermutationOptimization(3, cost_hidden=5, steps=2, eta_init=0.7,
                                                                         **kw),
    "PermutationOptimization po-la": lambda **kw: PermutationOptimization(
        3, cost_hidden=5, steps=6, permutation="po-la", num_positions=6, grid=(2, 3), **kw),
    "LinAssign": lambda **kw: LinAssign(3, num_positions=6, **kw),
    "PermutationSetEncoder po-u": lambda **kw: PermutationSetEncoder(
        3, 6, PermutationOptimization(3, cost_hidden=5, steps=3, eta_init=1.5, **kw), **kw),
    "PermutationSetEncoder po-la": lambda **kw: PermutationSetEncoder(
        3, 6, PermutationOptimization(3, cost_hidden=5, steps=3, permutation="po-la", num_positions=8, **kw), **kw),
    "PermutationSetEncoder default po": lambda **kw: PermutationSetEncoder(3, 6, **kw),
    "PermutationSetEncoder none": lambda **kw: PermutationSetEncoder(3, 6, None, **kw),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_reset_parameters_reproduces_a_fresh_module(name):
    torch.manual_seed(0)
    fresh = BUILDERS[name]()
    torch.manual_seed(1)
    module = BUILDERS[name]()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)                                  # trained away from the init, eta included
    torch.manual_seed(0)
    module.reset_parameters()
    state, ref = module.state_dict(), fresh.state_dict()
    assert state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(state[k], ref[k]), k


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_factory_kwargs_create_float64_parameters(name):
    torch.manual_seed(0)
    module = BUILDERS[name](device="cpu", dtype=torch.float64)
    params = list(module.parameters())
    assert params and all(p.dtype == torch.float64 and p.device.type == "cpu" for p in params)
    assert all(b.dtype == torch.float64 for b in module.buffers())
    with torch.device("meta"):                           # the default device is honoured (no .to())
        assert all(p.is_meta for p in BUILDERS[name]().parameters())


def test_paper_initialisation():
    torch.manual_seed(0)
    enc = PermutationSetEncoder(13, 128, PermutationOptimization(13, cost_hidden=128, steps=3, eta_init=1.0))
    assert enc.eta.item() == 1.0
    H = 128
    for name, p in enc.lstm.named_parameters():
        if name.startswith("bias"):
            assert torch.equal(p, torch.zeros_like(p))
        else:                                            # Xavier per gate block of (H, fan_in)
            for gate in p.chunk(4, dim=0):
                bound = math.sqrt(6.0 / (gate.shape[0] + gate.shape[1]))
                assert gate.abs().max() <= bound and gate.abs().max() > 0.9 * bound
    cost = enc.po.cost
    assert torch.equal(cost.first.bias, torch.zeros(H)) and cost.last.bias is None
    bound = math.sqrt(6.0 / (cost.first.weight.shape[0] + cost.first.weight.shape[1]))
    assert cost.first.weight.abs().max() <= bound


EXTRA_REPR = [
    (PairwiseCost(3, (5, 4), channels=2, normalize=False, kernel="chunked"),
     ["in_features=3", "hidden=(5, 4)", "channels=2", "normalize=False", "kernel='chunked'"]),
    (LinearAssignmentLogits(3, 7, clip=10.0), ["in_features=3", "num_positions=7", "clip=10.0"]),
    (PermutationOptimization(3, cost_hidden=5, steps=2, permutation="po-la", num_positions=6, grid=(2, 3),
                             sinkhorn_iters=7, temperature=0.5, eta_init=0.25, logit_clip=9.0, check_finite=False),
     ["in_features=3", "permutation='po-la'", "steps=2", "cost_hidden=5", "cost_channels=2", "eta_init=0.25",
      "kernel='auto'", "num_positions=6", "logit_clip=9.0", "grid=(2, 3)", "sinkhorn_iters=7", "temperature=0.5",
      "check_finite=False"]),
    (LinAssign(3, num_positions=6, sinkhorn_iters=5, temperature=2.0, logit_clip=3.0),
     ["in_features=3", "permutation='linassign'", "steps=0", "num_positions=6", "logit_clip=3.0", "grid=None",
      "sinkhorn_iters=5", "temperature=2.0", "check_finite=None"]),
    # the encoder shows its own settings; its PO's are in the PO's repr (the next entry)
    (PermutationSetEncoder(3, 6, PermutationOptimization(3, cost_hidden=5, steps=4, sinkhorn_iters=3, temperature=0.5,
                                                         eta_init=2.0), check_finite=False),
     ["in_features=3", "hidden_size=6", "straight_through=False", "check_finite=False"]),
    (PermutationSetEncoder(3, 6, PermutationOptimization(3, cost_hidden=5, steps=4, sinkhorn_iters=3, temperature=0.5,
                                                         eta_init=2.0), check_finite=False).po,
     ["in_features=3", "permutation='po-u'", "steps=4", "cost_hidden=5", "cost_channels=1", "eta_init=2.0",
      "kernel='auto'", "grid=None", "sinkhorn_iters=3", "temperature=0.5", "check_finite=None"]),
    (PermutationSetEncoder(3, 6, None),
     ["in_features=3", "hidden_size=6", "po=None", "check_finite=None"]),
]


@pytest.mark.parametrize("module,expected", EXTRA_REPR, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_extra_repr_shows_every_hyper_parameter(module, expected):
    text = module.extra_repr()
    for item in expected:
        assert item in text, (item, text)
    assert text.count("=") == len(expected), text          # and nothing else


def test_xavier_rnn_projection_is_one_block():
    """An LSTM's projection weight (proj_size) holds no gate blocks: Xavier over its whole shape."""
    from setperm.init import xavier_rnn_

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 8, proj_size=6, num_layers=2)
    xavier_rnn_(lstm)
    for name, p in lstm.named_parameters():
        if name.startswith("weight_hr"):
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))       # (proj_size, hidden_size)
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound
        elif name.startswith("weight"):
            for gate in p.chunk(4, dim=0):
                bound = math.sqrt(6.0 / (gate.shape[0] + gate.shape[1]))
                assert gate.abs().max() <= bound and gate.abs().max() > 0.5 * bound
