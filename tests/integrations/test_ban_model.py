"""BAN model, counting module, the PO-U plugin and the official-code loader (integrations/ban).

Small models (H = 32, v_dim = 64, 8 glimpses) keep the file fast on 2 cores. The tests marked
``official`` need a jnhwkim/ban-vqa checkout in ``SETPERM_BAN_ROOT`` and are skipped otherwise.
"""
import copy
import io
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from integrations.ban import PatchedBan, build_ban, load_official, patch_ban
from integrations.ban.counting import Counter, box_iou, interpolated_one_hot, piecewise_linear
from integrations.ban.model import WeightNormLinear, padding_mask
from integrations.ban.official import build_official_ban
from integrations.ban.plugin import glimpse_sets, normalized_boxes

NTOKEN, ANSWERS, V_DIM, HID, GLIMPSES, T = 30, 12, 64, 32, 8, 14
TOL = dict(rtol=1e-5, atol=1e-5)


def make_batch(sizes, K=None, v_dim=V_DIM, seed=0):
    """Zero-padded batch as BAN's collate makes it: sample i has sizes[i] real boxes."""
    g = torch.Generator().manual_seed(seed)
    K = K or max(sizes)
    B = len(sizes)
    v = torch.rand(B, K, v_dim, generator=g) + 0.01
    xy = torch.rand(B, K, 2, generator=g) * 0.6
    wh = torch.rand(B, K, 2, generator=g) * 0.4 + 0.01
    b = torch.cat([xy, xy + wh, wh], 2)
    for i, n in enumerate(sizes):
        v[i, n:] = 0
        b[i, n:] = 0
    q = torch.randint(0, NTOKEN + 1, (B, T), generator=g)
    return v, b, q


def small_ban(seed=0):
    torch.manual_seed(seed)
    return build_ban(NTOKEN, ANSWERS, v_dim=V_DIM, num_hid=HID, gamma=GLIMPSES)


def crop(v, b, i, n, K=None):
    """Sample i alone, its n real boxes, zero-padded to K boxes (no padding when K is None)."""
    K = K or n
    v1 = v.new_zeros(1, K, v.shape[2])
    b1 = b.new_zeros(1, K, b.shape[2])
    v1[0, :n], b1[0, :n] = v[i, :n], b[i, :n]
    return v1, b1


# ----------------------------------------------------------------------------------- counting module

def test_piecewise_linear_is_monotone_from_0_to_1():
    w = torch.rand(17) + 0.1
    w[0] = 0
    x = torch.linspace(0, 1, 401)
    y = piecewise_linear(x, w)
    assert_close(y[0], torch.tensor(0.0))
    assert_close(y[-1], torch.tensor(1.0))
    assert bool((y[1:] - y[:-1] >= -1e-7).all())
    # uniform slopes give the identity
    ones = torch.ones(17)
    ones[0] = 0
    assert_close(piecewise_linear(x, ones), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 10, 10), (5,), ()])
def test_the_counters_table_lookup_gives_the_indexed_values_and_gradients(shape):
    """On the CPU the look-up is an index_select: the values and gradients of ``table[idx]`` (float64,
    repeated indices accumulate), as the embedding look-up used off the CPU gives them."""
    from integrations.ban.counting import _lookup
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 17, shape, generator=g)
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = []
    for lookup in (_lookup, lambda t, i: t[i], lambda t, i: nn.functional.embedding(i, t.unsqueeze(1)).squeeze(-1)):
        table = torch.randn(17, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(True)
        out = lookup(table, idx)
        assert out.shape == idx.shape and torch.equal(out, table.detach()[idx])
        (out * up).sum().backward()
        grads.append(table.grad)
    assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert_close(grads[0], grads[2], rtol=1e-12, atol=1e-12)


def test_interpolated_one_hot():
    out = interpolated_one_hot(torch.tensor([2.75, 0.0, 10.0, 12.0]), 10)
    assert_close(out.sum(1), torch.ones(4))
    assert_close(out[0, 2:4], torch.tensor([0.25, 0.75]))
    assert out[1, 0] == 1 and out[2, 10] == 1 and out[3, 10] == 1


def _disjoint_boxes(n):
    # boxes on a row, no overlaps: IoU = identity
    x1 = torch.arange(n, dtype=torch.float32) * 0.1
    return torch.stack([x1, torch.zeros(n), x1 + 0.05, torch.full((n,), 0.5)]).unsqueeze(0)  # (1, 4, n)


@pytest.mark.parametrize("count", [0, 1, 3, 7, 10])
def test_counter_counts_relevant_disjoint_boxes(count):
    # Counting paper, section 4: with identity f's, c relevant non-overlapping boxes give c^2 edges
    # (self-loops included), hence count c and full confidence
    counter = Counter(10)
    boxes = _disjoint_boxes(16)
    logits = torch.full((1, 16), -30.0)
    logits[0, torch.randperm(16)[:count]] = 30.0
    out = counter(boxes, logits)
    expected = torch.zeros(1, 11)
    expected[0, count] = 1
    assert_close(out, expected, rtol=0, atol=1e-4)


def test_counter_removes_duplicate_boxes():
    # a proposal repeated exactly (IoU 1) is one object: 3 distinct + 1 duplicate -> 3
    counter = Counter(10)
    boxes = _disjoint_boxes(12)
    boxes[0, :, 11] = boxes[0, :, 0]
    logits = torch.full((1, 12), -30.0)
    logits[0, [0, 1, 2, 11]] = 30.0
    assert int(counter(boxes, logits).argmax()) == 3
    assert_close(box_iou(boxes)[0, 0, 11], torch.tensor(1.0))


def test_counter_with_fewer_boxes_than_objects_equals_padded():
    torch.manual_seed(0)
    counter = Counter(10)
    for f in counter.f:
        f.weight.data.uniform_(0.1, 1.0)
    v, b, _ = make_batch([6, 6], K=6, seed=1)
    boxes = b[:, :, :4].transpose(1, 2)
    logits = torch.randn(2, 6)
    padded_boxes = torch.cat([boxes, torch.zeros(2, 4, 5)], 2)
    padded_logits = torch.cat([logits, torch.full((2, 5), float("-inf"))], 1)
    assert_close(counter(boxes, logits), counter(padded_boxes, padded_logits), **TOL)


# ----------------------------------------------------------------------------------------- BAN itself

def test_weight_norm_linear_matches_torch_weight_norm():
    lin = WeightNormLinear(7, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = torch.nn.utils.weight_norm(nn.Linear(7, 5), dim=None)
    ref.load_state_dict(lin.state_dict(), strict=True)
    with torch.no_grad():
        lin.weight_g.mul_(1.7)
        ref.weight_g.mul_(1.7)
    x = torch.randn(3, 7)
    assert_close(lin(x), ref(x), **TOL)
    # initialised like weight_norm does it: g = ||V||
    fresh = WeightNormLinear(9, 4)
    assert_close(fresh.weight_g, fresh.weight_v.norm())


def test_ban_shapes_and_padding_invariance():
    model = small_ban().eval()
    sizes = [10, 23, 37]
    v, b, q = make_batch(sizes)
    logits, att = model(v, b, q)
    assert logits.shape == (3, ANSWERS) and att.shape == (3, GLIMPSES, 37, T)
    # attention is a distribution over (box, word) pairs and 0 at padded boxes
    assert_close(att.sum((2, 3)), torch.ones(3, GLIMPSES), **TOL)
    assert float(att[0, :, 10:].detach().abs().max()) == 0.0
    for i, n in enumerate(sizes):
        alone, _ = model(*crop(v, b, i, n), q[i:i + 1])
        padded, _ = model(*crop(v, b, i, n, K=100), q[i:i + 1])
        assert_close(alone, logits[i:i + 1], **TOL)
        assert_close(padded, alone, **TOL)


def test_ban_rejects_bad_inputs():
    model = small_ban()
    v, b, q = make_batch([10, 12])
    with pytest.raises(ValueError, match="v must"):
        model(v[0], b, q)
    with pytest.raises(ValueError, match="v_dim"):
        model(v[..., :10], b, q)
    with pytest.raises(ValueError, match="b must"):
        model(v, b[:, :5], q)
    with pytest.raises(ValueError, match="q must"):
        model(v, b, q.float())


# -------------------------------------------------------------------------------------------- plugin

@pytest.mark.parametrize("permutation", ["po-u", "none"])
def test_patched_padding_invariance_and_no_nan(permutation):
    model = patch_ban(small_ban(), permutation).eval()
    sizes = [10, 31, 57]  # every sample but the last is padded
    v, b, q = make_batch(sizes, seed=2)
    logits, att = model(v, b, q)
    assert bool(torch.isfinite(logits).all()) and bool(torch.isfinite(att).all())
    for i, n in enumerate(sizes):
        alone, _ = model(*crop(v, b, i, n), q[i:i + 1])
        padded, _ = model(*crop(v, b, i, n, K=100), q[i:i + 1])
        assert_close(alone, logits[i:i + 1], **TOL)
        assert_close(padded, alone, **TOL)
    # gradients through a padded batch stay finite too (train mode, dropout on)
    model.train()
    out, _ = model(v, b, q)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert model.set_encoder.lstm.weight_ih_l0.grad.abs().sum() > 0


def test_patch_is_additive_after_the_counter_term():
    # with p_prj outputs forced to 0 the patched model computes exactly the original BAN
    base = small_ban().eval()
    patched = patch_ban(copy.deepcopy(base), "po-u").eval()
    with torch.no_grad():
        for proj in patched.p_prj:
            proj.main[0].weight_g.zero_()
            proj.main[0].bias.zero_()
    v, b, q = make_batch([12, 40], seed=3)
    assert_close(patched(v, b, q)[0], base(v, b, q)[0], rtol=0, atol=0)
    # and with the projections active it does not
    fresh = patch_ban(copy.deepcopy(base), "po-u").eval()
    assert not torch.allclose(fresh(v, b, q)[0], base(v, b, q)[0])


def test_permutation_off_returns_the_model_bit_identical():
    base = small_ban().eval()
    reference = copy.deepcopy(base)
    same = patch_ban(base, "off")
    assert same is base
    v, b, q = make_batch([10, 20], seed=4)
    assert torch.equal(same(v, b, q)[0], reference(v, b, q)[0])
    assert base.state_dict().keys() == reference.state_dict().keys()


def test_glimpse_sets_are_encoded_in_one_call():
    model = patch_ban(small_ban(), "po-u").eval()
    calls = []
    model.set_encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out)),
                                            with_kwargs=True)
    v, b, q = make_batch([10, 25, 33], seed=5)
    model(v, b, q)
    assert len(calls) == 1
    args, kwargs, out = calls[0]
    x = args[0]
    assert x.shape == (3 * GLIMPSES, 33, 13) and out.shape == (3 * GLIMPSES, 128)
    assert kwargs["mask"].shape == (3 * GLIMPSES, 33) and kwargs["weights"].shape == (3 * GLIMPSES, 33)
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(kwargs["weights"]).all())


@pytest.mark.parametrize("permutation", ["po-u", "none"])
def test_box_counts_on_the_host_give_the_same_values_and_gradients(permutation):
    v, b, q = make_batch([10, 31, 57], seed=3)
    results = []
    for counts in (None, torch.tensor([10, 31, 57])):
        model = patch_ban(small_ban(), permutation).eval()
        logits, att = model(v, b, q, box_counts=counts)
        logits.logsumexp(1).sum().backward()
        results.append([logits, att] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 2
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("counts", ["list", "tensor", None])
def test_the_path_cuda_takes_makes_the_host_wait_nowhere_with_or_without_box_counts(device_path, counts):
    """On the path CUDA takes (forced on the CPU: no host-side choices), the encoder's LSTM takes the
    set sizes from ``box_counts`` (a packed read: a list, as the training loop passes, or a host
    tensor) or, without them, reads the padded batch; a training step's forward and backward make
    the host wait for the device nowhere (conftest's ``HostWaits``), and all give the same values."""
    model = patch_ban(small_ban(), "po-u").train()
    v, b, q = make_batch([10, 31, 57], seed=4)
    host = torch.tensor([10, 31, 57])
    given = {"list": [10, 31, 57], "tensor": host, None: None}[counts]
    results = []
    for box_counts in (given, None):
        model.zero_grad()
        torch.manual_seed(0)                                              # the same dropout masks
        with device_path(host=(host,)):
            logits, _ = model(v, b, q, box_counts=box_counts)
            logits.sum().backward()
        results.append([logits] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("permutation", ["po-u", "po-la", "none", "off"])
def test_every_tensor_made_on_the_way_is_on_the_inputs_device(on_meta, permutation):
    """A training step's forward and backward on the ``meta`` device, which like CUDA refuses to
    combine its tensors with a CPU tensor of more than zero dimensions (tests/test_devices.py): with
    the box counts on the host (the LSTM's packed read) and without (its padded read)."""
    kw = {"num_positions": 57} if permutation == "po-la" else {}
    model = patch_ban(small_ban(), permutation, **kw).train().to("meta")
    v, b, q = (t.to("meta") for t in make_batch([10, 31, 57], seed=4))
    for extra in ([{}] if permutation == "off" else [{"box_counts": [10, 31, 57]}, {}]):
        with on_meta():
            logits, att = model(v, b, q, **extra)
            logits.sum().backward()
        assert logits.shape == (3, ANSWERS) and logits.device.type == "meta" and att.device.type == "meta"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(g.device.type == "meta" for g in grads)


def test_box_counts_are_checked():
    model = patch_ban(small_ban(), "po-u").eval()
    v, b, q = make_batch([3, 5], seed=1)
    for counts, message in ((torch.tensor([3.0, 5.0]), "integer CPU tensor.*got torch.float32"),
                            ([3.0, 5.0], "integer CPU tensor.*got torch.float32"),
                            (torch.tensor([3]), r"shape \(B,\) = \(2,\), got torch.int64 of shape \(1,\)"),
                            ([3, 5, 1], r"shape \(B,\) = \(2,\), got torch.int64 of shape \(3,\)"),
                            (3, "a sequence of ints, got int"), (["a", "b"], "a sequence of ints, got list"),
                            (torch.tensor([3, 6]), r"in \[0, K=5\].*max 6")):
        with pytest.raises(ValueError, match="box_counts must .*" + message):
            model(v, b, q, box_counts=counts)
    logits, _ = model(v, b, q, box_counts=(3, 5))                        # a tuple of ints is a sequence too
    assert_close(logits, model(v, b, q, box_counts=torch.tensor([3, 5]))[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("kernel", ["auto", "fused"])
def test_cuda_forward_and_backward_of_ban_po_u_make_no_host_synchronisation(kernel, without_cuda_sync):
    model = patch_ban(small_ban(), "po-u", kernel=kernel).cuda().train()
    v, b, q = (t.cuda() for t in make_batch([10, 31, 57], seed=4))
    counts = torch.tensor([10, 31, 57])                      # the training loop's batch.mask.sum(1)
    for _ in range(2):                                       # warm-up: compilation, cuBLAS / cuDNN handles
        model(v, b, q, box_counts=counts)[0].sum().backward()
        model(v, b, q)[0].sum().backward()
    torch.cuda.synchronize()
    without_cuda_sync(lambda: model(v, b, q, box_counts=counts)[0])      # host counts: the packed LSTM read
    without_cuda_sync(lambda: model(v, b, q)[0])                         # device counts: the padded read


def test_glimpse_set_elements():
    # F.4: [boxes / largest coordinate, max-over-words logit, projected feature]; set b * G + g
    v, b, _ = make_batch([10, 15], seed=6)
    mask = padding_mask(v)
    G, K = 3, 15
    logits = torch.randn(2, G, K, T)
    logits = logits.masked_fill(~mask[:, None, :, None], float("-inf"))
    feats = torch.randn(2, K, 8)
    x, w, m = glimpse_sets(b, logits, feats, mask)
    assert x.shape == (2 * G, K, 13)
    for i in range(2):
        n = int(mask[i].sum())
        for g in range(G):
            s = i * G + g
            assert_close(x[s, :n, :4], b[i, :n, :4] / b[i, :n, :4].max(), rtol=0, atol=1e-6)
            assert_close(x[s, :n, 4], logits[i, g, :n].max(1)[0], rtol=0, atol=0)
            assert_close(w[s, :n], logits[i, g, :n].max(1)[0], rtol=0, atol=0)
            assert_close(x[s, :n, 5:], feats[i, :n], rtol=0, atol=0)
            assert bool(m[s, :n].all()) and not bool(m[s, n:].any())
            assert float(x[s, n:].abs().sum()) == 0.0 and float(w[s, n:].abs().sum()) == 0.0
    # the largest real coordinate is 1 after normalisation, whatever the padding
    assert_close(normalized_boxes(b, mask).amax((1, 2)), torch.ones(2))


def _encoder_calls(model):
    calls = []
    model.set_encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    perms = []
    model.set_encoder.po.register_forward_hook(lambda m, args, out: perms.append(out))
    return calls, perms


def test_order_by_geometry_orders_on_the_box_coordinates_alone():
    model = patch_ban(small_ban(), "po-u", order_by="geometry").eval()
    assert model.set_encoder.po.in_features == 4 and "order_by='geometry'" in repr(model)
    calls, perms = _encoder_calls(model)
    v, b, q = make_batch([10, 25], seed=11)
    logits, _ = model(v, b, q)
    # the cost sees x1, y1, x2, y2 / largest coordinate, the same for every glimpse
    key = calls[0]["order_by"]
    assert key.shape == (2 * GLIMPSES, 25, 4)
    assert_close(key, normalized_boxes(b, padding_mask(v)).repeat_interleave(GLIMPSES, 0), rtol=0, atol=0)
    # other box features (same boxes, same question): the same permutations, another answer
    v2 = v.clone()
    v2[v > 0] = torch.rand(int((v > 0).sum()), generator=torch.Generator().manual_seed(3)) + 0.01
    logits2, _ = model(v2, b, q)
    assert_close(perms[1], perms[0], rtol=0, atol=0)
    assert not torch.allclose(logits2, logits)
    # padding invariance as for the paper's configuration
    for i, n in enumerate([10, 25]):
        alone, _ = model(*crop(v, b, i, n), q[i:i + 1])
        padded, _ = model(*crop(v, b, i, n, K=40), q[i:i + 1])
        assert_close(alone, logits[i:i + 1], **TOL)
        assert_close(padded, alone, **TOL)
    with pytest.raises(ValueError, match="order_by"):
        patch_ban(small_ban(), "none", order_by="geometry")
    with pytest.raises(ValueError, match="order_by must be one of"):
        patch_ban(small_ban(), "po-u", order_by="x")


@pytest.mark.parametrize("permutation", ["po-u", "none"])
def test_given_relevance_replaces_the_attention_logits_of_every_glimpse(permutation):
    model = patch_ban(small_ban(), permutation).eval()
    calls = []
    model.set_encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs)),
                                            with_kwargs=True)
    sizes = [12, 30]
    v, b, q = make_batch(sizes, seed=12)
    rel = torch.where(torch.rand(2, 30, generator=torch.Generator().manual_seed(0)) > 0.5, 4.0, -4.0)
    logits, _ = model(v, b, q, relevance=rel)
    (x,), kwargs = calls[0]
    mask = padding_mask(v)
    expect = torch.where(mask, rel, torch.zeros_like(rel)).repeat_interleave(GLIMPSES, 0)
    assert_close(kwargs["weights"], expect, rtol=0, atol=0)          # the weights ...
    assert_close(x[..., 4], expect, rtol=0, atol=0)                   # ... and the logit feature
    assert not torch.allclose(model(v, b, q)[0], logits)
    for i, n in enumerate(sizes):                                     # padded = unpadded with it too
        alone, _ = model(*crop(v, b, i, n), q[i:i + 1], relevance=rel[i:i + 1, :n])
        assert_close(alone, logits[i:i + 1], **TOL)
    with pytest.raises(ValueError, match=r"relevance must be float logits of shape \(B, K\) = \(2, 30\)"):
        model(v, b, q, relevance=rel[:, :5])
    with pytest.raises(ValueError, match="relevance"):
        model(v, b, q, relevance=rel > 0)


def test_state_dict_round_trip():
    model = patch_ban(small_ban(seed=0), "po-u", eta_init=1.7).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = patch_ban(small_ban(seed=1), "po-u").eval()
    v, b, q = make_batch([10, 30], seed=7)
    assert not torch.allclose(other(v, b, q)[0], model(v, b, q)[0])
    other.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert_close(other(v, b, q)[0], model(v, b, q)[0], rtol=0, atol=0)
    assert_close(other.eta, model.eta)
    # the original BAN's weights sit under "ban.", so a plain BAN checkpoint loads into .ban
    assert set(small_ban().state_dict()) == {k[4:] for k in model.state_dict() if k.startswith("ban.")}


def test_data_parallel_on_cpu():
    model = patch_ban(small_ban(), "po-u").eval()
    v, b, q = make_batch([10, 20], seed=8)
    wrapped = nn.DataParallel(model)  # no GPU: DataParallel just calls the module
    assert_close(wrapped(v, b, q)[0], model(v, b, q)[0], rtol=0, atol=0)
    assert wrapped.module.glimpse == GLIMPSES


@pytest.mark.parametrize("permutation", ["po-u", "off"])
def test_distributed_data_parallel_single_process(tmp_path, permutation):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = patch_ban(small_ban(), permutation)
        # default find_unused_parameters=False: DDP fails at the second step if any trainable
        # parameter gets no gradient (the counter's unused f[8:] are frozen for that reason)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        v, b, q = make_batch([10, 20], seed=9)
        for step in range(2):
            opt.zero_grad()
            # (the plain BAN takes no box_counts; a PatchedBan the training loop's list of ints)
            out, _ = ddp(v, b, q, **({"box_counts": [10, 20]} if step and isinstance(model, PatchedBan) else {}))
            out.logsumexp(1).mean().backward()
            opt.step()
        assert bool(torch.isfinite(out).all())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_available(), reason="CUDA is not available")
def test_cuda_distributed_data_parallel_leaves_the_box_counts_on_the_host(tmp_path):
    """DDP with ``device_ids`` moves tensor inputs to the GPU; the training loop's list of box counts
    stays on the host, so the step makes no synchronisation for the set sizes."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = patch_ban(small_ban(), "po-u").cuda()
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        v, b, q = make_batch([10, 20], seed=9)
        for _ in range(2):
            out, _ = ddp(v, b, q, box_counts=[10, 20])                # v, b, q moved by DDP
            out.logsumexp(1).mean().backward()
        assert out.is_cuda and bool(torch.isfinite(out).all())
    finally:
        dist.destroy_process_group()


def test_patch_ban_rejects_bad_arguments():
    model = small_ban()
    with pytest.raises(ValueError, match=r"permutation must be one of \('po-u', 'po-la', 'none', 'off'\), got 'po'"):
        patch_ban(model, "po")
    with pytest.raises(ValueError, match="lacks"):
        patch_ban(nn.Linear(3, 3), "po-u")
    with pytest.raises(ValueError, match="already patched"):
        patch_ban(patch_ban(model, "po-u"), "none")
    with pytest.raises(ValueError, match="DataParallel"):
        patch_ban(nn.DataParallel(model), "po-u")


def test_permutation_none_is_the_lstm_baseline():
    model = patch_ban(small_ban(), "none")
    assert model.eta is None and model.set_encoder.po is None
    assert patch_ban(small_ban(), "po-u").eta is not None


# --------------------------------------------------------------------------------- official loader

def test_load_official_rejects_non_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jnhwkim/ban-vqa checkout"):
        load_official(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_official(tmp_path / "missing")


BAN_ROOT = os.environ.get("SETPERM_BAN_ROOT")
official = pytest.mark.skipif(
    not BAN_ROOT or not (Path(BAN_ROOT) / "base_model.py").is_file(),
    reason="set SETPERM_BAN_ROOT to a jnhwkim/ban-vqa checkout to test against the official code")


@pytest.fixture(scope="module")
def off():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load_official(BAN_ROOT)


def official_ban(off, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return build_official_ban(None, NTOKEN, ANSWERS, v_dim=V_DIM, num_hid=HID, gamma=GLIMPSES, official=off)


@official
def test_official_loads_without_polluting_sys_modules(off):
    assert "utils" not in sys.modules or sys.modules["utils"] is not off.utils
    for name in ("base_model", "fc", "bc", "attention", "counting"):
        assert name not in sys.modules
    before = set(Path(BAN_ROOT).rglob("*"))
    load_official(BAN_ROOT)
    assert set(Path(BAN_ROOT).rglob("*")) == before  # nothing written into the checkout (no .pyc)


@official
def test_official_forward_and_backward_on_cpu(off):
    model = official_ban(off).train()
    v, b, q = make_batch([10, 30], seed=10)
    logits, att = model(v, b, q, None)
    assert logits.shape == (2, ANSWERS) and bool(torch.isfinite(logits).all())
    logits.sum().backward()  # raises on torch 2.x without the in-place dropout fix
    labels = torch.rand(2, ANSWERS)
    score = off.train.compute_score_with_logits(logits.detach(), labels)  # unconditional .cuda() fixed
    assert score.shape == (2, ANSWERS)
    batch = [(torch.rand(3, 4), torch.tensor(1)), (torch.rand(5, 4), torch.tensor(2))]
    v_b, _ = off.utils.trim_collate(batch)  # torch._six and collections.abc fixes
    assert v_b.shape == (2, 5, 4)


@official
def test_official_state_dict_loads_into_project_ban(off):
    ref = official_ban(off).eval()
    mine = build_ban(NTOKEN, ANSWERS, v_dim=V_DIM, num_hid=HID, gamma=GLIMPSES).eval()
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    mine.load_state_dict(ref.state_dict(), strict=True)
    v, b, q = make_batch([10, 27, 44], seed=11)
    ref_logits, ref_att = ref(v, b, q, None)
    logits, att = mine(v, b, q)
    assert_close(logits, ref_logits, **TOL)
    assert_close(att, ref_att, **TOL)
    # and back: the project's state_dict loads into the official model
    ref2 = official_ban(off, seed=1).eval()
    ref2.load_state_dict(mine.state_dict(), strict=True)
    assert_close(ref2(v, b, q, None)[0], logits, **TOL)


@official
@pytest.mark.parametrize("permutation", ["po-u", "none"])
def test_patch_ban_on_official_model(off, permutation):
    ref = official_ban(off).eval()
    model = patch_ban(ref, permutation).eval()
    assert isinstance(model, PatchedBan) and model.ban is ref
    assert not ref.counter.f[8].weight.requires_grad and ref.counter.f[7].weight.requires_grad
    sizes = [10, 35]
    v, b, q = make_batch(sizes, seed=12)
    logits, _ = model(v, b, q)
    assert bool(torch.isfinite(logits).all())
    for i, n in enumerate(sizes):
        padded, _ = model(*crop(v, b, i, n, K=100), q[i:i + 1])
        assert_close(padded, logits[i:i + 1], **TOL)
    # the same weights in the project's BAN give the same patched model
    mine = patch_ban(build_ban(NTOKEN, ANSWERS, v_dim=V_DIM, num_hid=HID, gamma=GLIMPSES), permutation).eval()
    mine.load_state_dict(model.state_dict(), strict=True)
    assert_close(mine(v, b, q)[0], logits, **TOL)
    model.train()
    model(v, b, q)[0].sum().backward()
    assert model.p_prj[0].main[0].weight_v.grad is not None


@official
@pytest.mark.parametrize("permutation", ["off", "po-u"])
def test_official_model_trains_under_distributed_data_parallel(off, tmp_path, permutation):
    """The official Counter holds 16 piecewise-linear functions of which the forward uses 8: as built
    (the plain BAN too, which patch_ban returns unchanged) the unused ones are frozen, so DDP's
    second step does not fail waiting for their gradients."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    model = patch_ban(official_ban(off), permutation)
    counter = model.counter if permutation == "off" else model.ban.counter
    assert not any(p.requires_grad for f in counter.f[8:] for p in f.parameters())
    assert all(p.requires_grad for f in counter.f[:8] for p in f.parameters())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        v, b, q = make_batch([10, 20], seed=9)
        for _ in range(2):
            opt.zero_grad()
            out, _ = ddp(v, b, q, None)
            out.logsumexp(1).mean().backward()
            opt.step()
        assert bool(torch.isfinite(out).all())
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_compiled_kernel_gives_the_same_patched_model():
    """patch_ban(..., kernel="compiled") (the train script's --kernel): same logits and gradients."""
    base = small_ban()
    models = [patch_ban(copy.deepcopy(base), "po-u", kernel=k).eval() for k in ("chunked", "compiled")]
    models[1].load_state_dict(models[0].state_dict())
    v, b, q = make_batch([10, 31, 57], seed=5)
    outs = []
    for m in models:
        logits, _ = m(v, b, q)
        logits.logsumexp(1).sum().backward()
        outs.append((logits.detach(), m.set_encoder.po.cost.first.weight.grad.clone()))
    assert models[1].set_encoder.po.cost.kernel == "compiled"
    assert_close(outs[1][0], outs[0][0], **TOL)
    assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-5)


def _non_contiguous_logits(module, inputs, out):
    """What the official bc.py's einsum returns on CUDA: the same values in a non-contiguous layout."""
    return out.transpose(-1, -2).contiguous().transpose(-1, -2)


@official
@pytest.mark.parametrize("permutation", ["off", "po-u"])
def test_official_model_takes_non_contiguous_attention_logits(off, permutation):
    """official.py's fix 5: BiAttention.forward_all reshapes the bilinear logits instead of viewing
    them, so the model runs when bc.py's einsum returns them non-contiguous (as it does on CUDA)."""
    ref = official_ban(off).eval()
    model = ref if permutation == "off" else patch_ban(ref, permutation).eval()
    v, b, q = make_batch([10, 30], seed=13)
    call = (lambda: model(v, b, q, None)) if permutation == "off" else (lambda: model(v, b, q))
    expected = call()[0]
    handle = ref.v_att.logits.register_forward_hook(_non_contiguous_logits)
    try:
        assert not ref.v_att.logits(v, ref.q_emb.forward_all(ref.w_emb(q))).is_contiguous()
        logits = call()[0]
        logits.sum().backward()
    finally:
        handle.remove()
    assert_close(logits, expected, rtol=1e-6, atol=1e-6)


@official
@pytest.mark.parametrize("permutation", ["off", "po-u"])
def test_official_model_puts_every_tensor_it_makes_on_the_inputs_device(off, on_meta, permutation):
    """The official BAN and official BAN + PO-U, a training step's forward and backward on the
    ``meta`` device (see test_every_tensor_made_on_the_way_is_on_the_inputs_device)."""
    ref = official_ban(off).train()
    model = (ref if permutation == "off" else patch_ban(ref, permutation).train()).to("meta")
    v, b, q = (t.to("meta") for t in make_batch([10, 31, 57], seed=4))
    with on_meta():
        logits = model(v, b, q, None)[0] if permutation == "off" else model(v, b, q, box_counts=[10, 31, 57])[0]
        logits.sum().backward()
    assert logits.shape == (3, ANSWERS) and logits.device.type == "meta"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(g.device.type == "meta" for g in grads)


@official
@pytest.mark.parametrize("permutation", ["off", "po-u"])
def test_official_model_on_the_path_cuda_takes_makes_the_host_wait_nowhere(off, device_path, permutation):
    """The official BAN and official BAN + PO-U, a training step's forward and backward with the
    box counts on the host as the training loop passes them: nothing makes the host wait for the
    device (conftest's ``HostWaits``)."""
    ref = official_ban(off).train()
    model = ref if permutation == "off" else patch_ban(ref, permutation).train()
    v, b, q = make_batch([10, 31, 57], seed=4)
    with device_path():
        logits = model(v, b, q, None)[0] if permutation == "off" else model(v, b, q, box_counts=[10, 31, 57])[0]
        logits.sum().backward()
    assert torch.isfinite(logits).all()
