"""PO-U at the glimpses of BAN (perm-optim paper, section 4.4 and appendix F.4).

For every glimpse g the boxes form a set of 13-vectors: the four box coordinates divided by the
sample's largest coordinate, the glimpse's attention logit (max over question words, as the counting
module uses it) and a learned 2048 -> 8 projection of the box feature. One ``PermutationSetEncoder``
shared by all glimpses (PO-U, T = 3, pairwise f 26 -> 128 -> 1, relevance weights sigmoid(logit),
LSTM 13 -> 128, last cell state) encodes the set; ``p_prj[g]`` (128 -> H, ReLU) adds the encoding to
BAN's hidden state right after the counter term of glimpse g.

Differences from the authors' released perm-optim code (github Cyanogenoid/perm-optim):
padded boxes (logit -inf) are masked out of the cost, Sinkhorn and LSTM instead of producing NaN,
so the patched model keeps BAN's padding invariance; the eight sets are encoded in one batched call
(the attention logits exist before the loop) instead of eight calls; the permutation ``"none"`` is the
paper's "BAN + LSTM" baseline (same encoder without the permutation), ``"po-la"`` the same encoder
with the linear-assignment start (needs ``num_positions`` >= the number of boxes); Sinkhorn runs the
paper's 4 iterations (appendix B) where the released BAN patch passes T (3) as its iteration count
(``sinkhorn_iters=3`` gives that).

Two options for the diagnosis of the synthetic comparison (defaults = the paper's configuration):
``order_by="geometry"`` optimises the permutation on the four normalised box coordinates alone (the
LSTM still reads the 13-vectors), and ``forward(..., relevance=...)`` replaces the attention-derived
relevance of every glimpse (the logit feature and the weights) by given logits, e.g. the ground truth
of which boxes the question is about (the oracle ablation).

``PatchedBan`` wraps the original model as the submodule ``ban`` (official checkpoints load into
``patched.ban``) and runs the glimpse loop itself by calling that model's submodules, so it works on
models from the official ``base_model.build_ban`` and from ``model.build_ban`` alike, and needs no
closures: ``state_dict``, ``DataParallel`` and ``DistributedDataParallel`` see a plain module tree.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from setperm import PermutationOptimization, PermutationSetEncoder

from .counting import freeze_unused_functions
from .model import FCNet, ban_attend, ban_fuse, check_ban_inputs, padding_mask

__all__ = ["PatchedBan", "patch_ban", "glimpse_sets", "normalized_boxes", "PERMUTATIONS", "ORDER_BY"]

# "po-u" / "po-la": BAN + PO (F.4); "none": BAN + LSTM (the encoder without a permutation, as
# setperm's po=None); "off": the plain BAN (patch_ban returns the model unchanged).
PERMUTATIONS = ("po-u", "po-la", "none", "off")
# what the permutation is optimised on: "all" the 13-vector (F.4), "geometry" the box coordinates only
ORDER_BY = ("all", "geometry")
_BAN_SUBMODULES = ("w_emb", "q_emb", "v_att", "b_net", "q_prj", "c_prj", "counter", "classifier")


def normalized_boxes(b: Tensor, mask: Tensor) -> Tensor:
    """x1, y1, x2, y2 of ``b`` (B, K, >=4) divided by each sample's largest coordinate over its real
    boxes (``mask`` (B, K), True = real), as the released patch does. Padded rows are 0. -> (B, K, 4)."""
    boxes = b[:, :, :4]
    real = mask.unsqueeze(2)
    largest = torch.where(real, boxes, torch.full_like(boxes, float("-inf"))).amax(dim=(1, 2))
    # a sample without real boxes, or with all-zero coordinates, is left unscaled
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    return torch.where(real, boxes / scale[:, None, None], torch.zeros_like(boxes))


def glimpse_sets(b: Tensor, logits: Tensor, features: Tensor, mask: Tensor,
                 relevance: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The G glimpses' box sets, flattened for one batched encoder call (appendix F.4).

    Args:
        b: (B, K, >=4) box geometry, x1, y1, x2, y2 first.
        logits: (B, G, K, T) bilinear attention logits, -inf at padded boxes.
        features: (B, K, F) projected box features (F = 8).
        mask: (B, K) bool, True = real box.
        relevance: (B, K) logits that replace every glimpse's max-over-words attention logit (in the
            elements and as the weights); None (default) = the attention's, as the paper.

    Returns:
        ``x`` (B * G, K, 4 + 1 + F) elements [boxes, max-over-words logit, features], ``weights``
        (B * G, K) the relevance logits and ``mask`` (B * G, K). Set ``b * G + g`` is glimpse g of
        sample b. Padded boxes are 0 everywhere: the -inf logits are replaced (``torch.where``, so
        neither the values nor their gradients touch -inf) before any arithmetic.
    """
    B, G, K, _ = logits.shape
    if relevance is None:
        relevance = logits.max(dim=3)[0]  # (B, G, K), as BAN feeds the counter
    else:
        relevance = relevance.unsqueeze(1).expand(B, G, K)
    real = mask.unsqueeze(1).expand(B, G, K)
    relevance = torch.where(real, relevance, torch.zeros_like(relevance))
    per_box = torch.cat([normalized_boxes(b, mask), torch.where(mask.unsqueeze(2), features,
                                                               torch.zeros_like(features))], 2)
    per_box = per_box.unsqueeze(1).expand(B, G, K, per_box.shape[2])
    x = torch.cat([per_box[..., :4], relevance.unsqueeze(3), per_box[..., 4:]], 3)
    return x.reshape(B * G, K, -1), relevance.reshape(B * G, K), real.reshape(B * G, K)


# PatchedBan's keyword arguments that are the encoder's own; the others build its PO
_ENCODER_OWN = ("straight_through", "check_finite", "read")


class PatchedBan(nn.Module):
    """A BAN (official or ``model.BanModel``) with a shared permutation-set encoder at its glimpses.

    Submodules: ``ban`` (the original model, unchanged), ``set_encoder`` (``PermutationSetEncoder``,
    shared by the glimpses), ``box_proj`` (``nn.Linear(v_dim, 8)``), ``p_prj`` (G x ``FCNet([hidden,
    H], 'ReLU', 0)``).

    ``forward(v (B, K, v_dim), b (B, K, >=4), q (B, T), labels=None, *, relevance=None, box_counts=None)
    -> (logits (B, A), att (B, G, K, T))``, the official signature. Padded boxes are all-zero rows of
    ``v``. ``relevance`` (B, K) float logits replaces the glimpses' attention-derived relevance (an
    ablation; see the module docstring). ``box_counts`` (B,) ints, a CPU tensor or a sequence: the
    number of real boxes of each image, which are its first rows of ``v`` (as ``data.collate_vqa``
    lays batches out; the training loop passes ``batch.mask.sum(1).tolist()``, a list, which
    ``DistributedDataParallel`` leaves on the host where it moves tensor inputs to the GPU). With it
    the encoder's LSTM reads a packed sequence with the sizes from the host; without it, the whole
    padded batch (``setperm.encoder.last_state``). Neither copies the sizes to the host; the values
    are the same.

    Patching sets ``requires_grad=False`` on ``ban.counter.f[8:]``, the counter's unused functions
    (never updated by official training either), so DDP works without ``find_unused_parameters``.

    ``permutation``: ``"po-u"`` (default, F.4), ``"po-la"`` or ``"none"`` (BAN + LSTM). ``order_by``:
    ``"all"`` (default, F.4: the cost sees the 13-vectors) or ``"geometry"`` (the cost sees x1, y1, x2, y2
    only). The new modules are created on ``device`` / in ``dtype`` (default: those of the BAN's parameters).
    """

    def __init__(self, ban: nn.Module, permutation: str = "po-u", *, v_dim: Optional[int] = None,
                 num_hid: Optional[int] = None, proj_features: int = 8, hidden_size: int = 128,
                 cost_hidden: int = 128, steps: int = 3, order_by: str = "all", device=None, dtype=None,
                 **encoder_kwargs):
        super().__init__()
        if permutation not in ("po-u", "po-la", "none"):
            raise ValueError(f"permutation must be one of ('po-u', 'po-la', 'none') for PatchedBan (patch_ban "
                             f"takes 'off' for the plain BAN), got {permutation!r}")
        if order_by not in ORDER_BY:
            raise ValueError(f"order_by must be one of {ORDER_BY}, got {order_by!r}")
        if order_by != "all" and permutation == "none":
            raise ValueError(f"order_by={order_by!r} needs a permutation, got permutation='none' (BAN + LSTM)")
        _check_ban(ban)
        v_dim = int(v_dim if v_dim is not None else ban.v_att.logits.v_dim)
        num_hid = int(num_hid if num_hid is not None else ban.q_emb.num_hid)
        ref = next(ban.parameters())
        factory_kwargs = {"device": ref.device if device is None else device,
                          "dtype": ref.dtype if dtype is None else dtype}
        self.permutation = permutation
        self.order_by = order_by
        self.ban = ban
        # the counter's unused f[8:] would stall DistributedDataParallel (official models included)
        freeze_unused_functions(ban.counter)
        in_features = 4 + 1 + proj_features
        order_features = 4 if order_by == "geometry" else None
        own = {k: encoder_kwargs.pop(k) for k in _ENCODER_OWN if k in encoder_kwargs}
        po = None
        if permutation != "none":
            # check_finite=False: the encoder checks its input itself, once
            po = PermutationOptimization(order_features or in_features, cost_hidden=cost_hidden, steps=steps,
                                         permutation=permutation, check_finite=False, **encoder_kwargs,
                                         **factory_kwargs)
        self.set_encoder = PermutationSetEncoder(in_features, hidden_size, po, order_features=order_features, **own,
                                                 **factory_kwargs)
        # F.4: projecting the 2048-d features to 8 dims was needed "to not inhibit learning of the
        # rest of the model"; Xavier weights and zero bias as in the released code
        self.box_proj = nn.Linear(v_dim, proj_features, **factory_kwargs)
        nn.init.xavier_uniform_(self.box_proj.weight)
        nn.init.zeros_(self.box_proj.bias)
        self.p_prj = nn.ModuleList(FCNet([hidden_size, num_hid], "ReLU", 0.0, **factory_kwargs)
                                   for _ in range(ban.glimpse))

    @property
    def glimpse(self) -> int:
        return self.ban.glimpse

    @property
    def eta(self) -> Optional[Tensor]:
        return self.set_encoder.eta

    def encode_glimpses(self, v: Tensor, b: Tensor, logits: Tensor, mask: Tensor,
                        relevance: Optional[Tensor] = None, box_counts: Optional[Tensor] = None) -> Tensor:
        """All G glimpses' sets through the shared encoder in ONE call -> (B, G, hidden_size).
        ``box_counts``: ``mask``'s row sums as a CPU tensor, when the caller has them."""
        B, G = logits.shape[:2]
        x, weights, set_mask = glimpse_sets(b, logits, self.box_proj(v), mask, relevance)
        order_by = x[..., :4] if self.order_by == "geometry" else None     # the normalised box coordinates
        if box_counts is not None:
            # set b * G + g is glimpse g of image b; host lengths: no copy of the sizes to the host
            lengths = box_counts.unsqueeze(1).expand(B, G).reshape(B * G)
            h = self.set_encoder(x, lengths=lengths, weights=weights, order_by=order_by)
        else:
            h = self.set_encoder(x, mask=set_mask, weights=weights, order_by=order_by)
        return h.view(B, G, -1)

    def forward(self, v: Tensor, b: Tensor, q: Tensor, labels: Optional[Tensor] = None, *,
                relevance: Optional[Tensor] = None, box_counts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        check_ban_inputs(v, b, q, self.box_proj.in_features)
        if box_counts is not None:
            box_counts = _host_counts(box_counts, v)
        if relevance is not None:
            if not isinstance(relevance, Tensor) or not relevance.is_floating_point() \
                    or tuple(relevance.shape) != tuple(v.shape[:2]):
                got = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance).__name__
                raise ValueError(f"relevance must be float logits of shape (B, K) = {tuple(v.shape[:2])}, got {got}")
            relevance = relevance.to(v.dtype)
        q_emb, att, logits = ban_attend(self.ban, v, q)
        encoding = self.encode_glimpses(v, b, logits, padding_mask(v), relevance, box_counts)
        extra = [self.p_prj[g](encoding[:, g]) for g in range(self.ban.glimpse)]
        return ban_fuse(self.ban, v, b, q_emb, att, logits, extra), att

    def extra_repr(self) -> str:
        return f"permutation={self.permutation!r}, order_by={self.order_by!r}"


def _host_counts(box_counts, v: Tensor) -> Tensor:
    """``box_counts`` (a CPU integer tensor or a sequence of ints) checked -> (B,) int64 CPU tensor."""
    if isinstance(box_counts, Tensor):
        counts = box_counts
    else:
        try:
            counts = torch.as_tensor(list(box_counts))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"box_counts must be an integer CPU tensor or a sequence of ints, got "
                             f"{type(box_counts).__name__}") from None
    if (counts.device.type != "cpu" or counts.dtype.is_floating_point or counts.is_complex()
            or counts.dtype == torch.bool or tuple(counts.shape) != (v.shape[0],)):
        raise ValueError(f"box_counts must be an integer CPU tensor or a sequence of ints of shape (B,) = "
                         f"({v.shape[0]},), got {counts.dtype} of shape {tuple(counts.shape)} on {counts.device}")
    if len(counts) and (int(counts.min()) < 0 or int(counts.max()) > v.shape[1]):
        raise ValueError(f"box_counts must lie in [0, K={v.shape[1]}], got min {int(counts.min())} and max "
                         f"{int(counts.max())}")
    return counts.to(torch.int64)


def _check_ban(model: nn.Module) -> None:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError("model: patch the BAN before wrapping it in DataParallel/DistributedDataParallel "
                         f"(got {type(model).__name__})")
    if isinstance(model, PatchedBan):
        raise ValueError("model is already patched (PatchedBan); patch the original BAN once")
    missing = [n for n in _BAN_SUBMODULES + ("glimpse",) if not hasattr(model, n)]
    if missing:
        raise ValueError(f"model: expected a BAN (official base_model.BanModel or integrations.ban.model.BanModel); "
                         f"{type(model).__name__} lacks {', '.join(missing)}")


def patch_ban(model: nn.Module, permutation: str = "po-u", **encoder_kwargs) -> nn.Module:
    """Add the permutation-set encoder to every glimpse of ``model`` (appendix F.4).

    Args:
        model: a BAN from the official ``base_model.build_ban`` or from ``model.build_ban``.
        permutation: ``"po-u"`` (BAN + PO-U, the paper's model), ``"po-la"`` (BAN + PO-LA, needs
            ``num_positions``), ``"none"`` (BAN + LSTM: the same encoder without a permutation, as
            setperm's ``po=None``) or ``"off"`` (``model`` itself is returned, unchanged).
        **encoder_kwargs: ``order_by`` ("all"; "geometry": the cost sees the box coordinates only),
            ``hidden_size`` (128), ``cost_hidden`` (128), ``steps`` (3, F.4),
            ``proj_features`` (8), ``v_dim`` / ``num_hid`` (read from the model), ``device`` /
            ``dtype`` (those of the model), ``straight_through`` / ``check_finite`` / ``read`` (the
            ``PermutationSetEncoder``'s) and any other ``PermutationOptimization`` argument
            (``sinkhorn_iters``, ``eta_init``, ``num_positions``, ``kernel``, ...).

    Returns:
        ``model`` for ``"off"``, else a ``PatchedBan`` holding ``model`` as ``.ban``.
    """
    if permutation not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
    if permutation == "off":
        _check_ban(model)
        return model
    return PatchedBan(model, permutation, **encoder_kwargs)
