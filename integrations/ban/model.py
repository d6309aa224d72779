"""A self-contained BAN-8: Bilinear Attention Networks (Kim, Jun & Zhang, NeurIPS 2018) for VQA v2.

Written from the BAN paper (section 3: low-rank bilinear attention maps, bilinear attention networks,
residual learning of attention; section 4.3: counting module) and the counting paper
(``counting.py``). Submodule names and parameter shapes are those of the official implementation
(github jnhwkim/ban-vqa), so an official ``state_dict`` loads with ``strict=True``; the forward
computes the same function (see ``tests/integrations/test_ban_model.py``). Every linear layer is
weight-normalised with one scalar gain per matrix (``weight_norm(dim=None)``: ``W = g V / ||V||_F``),
stored as ``weight_g`` / ``weight_v`` like ``torch.nn.utils.weight_norm``.

Shapes (batch first): ``v`` (B, K, v_dim) box features with K = the largest box count of the batch
(10 ... 100 for adaptive bottom-up features) and padded rows all zero; ``b`` (B, K, >= 4) box
geometry, the first four columns x1, y1, x2, y2 normalised by the image size; ``q`` (B, T) question
tokens (T = 14, padded with index ``ntoken``).

Functional core: ``ban_attend`` (question encoding and the G attention maps, computed once) and
``ban_fuse`` (the residual glimpse loop and the classifier) take any model exposing the official
submodules, so ``plugin.py`` runs the same loop on official and project models.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .counting import Counter

__all__ = ["WeightNormLinear", "FCNet", "BCNet", "BiAttention", "WordEmbedding", "QuestionEmbedding",
           "SimpleClassifier", "BanModel", "build_ban", "ban_attend", "ban_fuse", "check_ban_inputs",
           "padding_mask"]


def _weight_norm(g: Tensor, v: Tensor) -> Tensor:
    # Salimans & Kingma (2016) with a single gain for the whole matrix
    return v * (g / v.norm())


class WeightNormLinear(nn.Module):
    """``nn.Linear`` with ``W = weight_g * weight_v / ||weight_v||_F`` (parameters ``weight_g`` (),
    ``weight_v`` (out, in), ``bias`` (out,)). Initialised like ``nn.Linear`` with ``g = ||V||``."""

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        v = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self.weight_g = nn.Parameter(v.norm().detach().clone())
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> Tensor:
        return _weight_norm(self.weight_g, self.weight_v)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=dim=None"


class FCNet(nn.Module):
    """Weight-normalised MLP ``dims[0] -> ... -> dims[-1]``; each layer is
    [Dropout(dropout) if dropout > 0] -> WeightNormLinear -> [activation if act != ''].
    The activation follows the last layer too. (..., dims[0]) -> (..., dims[-1])."""

    def __init__(self, dims: Sequence[int], act: str = "ReLU", dropout: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(WeightNormLinear(d_in, d_out, device=device, dtype=dtype))
            if act:
                layers.append(getattr(nn, act)())
        self.main = nn.Sequential(*layers)  # indices of the layers are part of the state_dict keys

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class BCNet(nn.Module):
    """Low-rank bilinear connection between two sets (BAN paper section 3.1, eq. 3 and 5).

    Both inputs are projected to a rank ``k * h_dim`` space, ``v_ = ReLU(U^T v)``, ``q_ = ReLU(V^T q)``.

    * ``h_out`` <= 32 (bilinear attention maps, eq. 9): ``forward(v, q)`` returns the logits
      ``(B, h_out, K, T)``, ``logit[g, i, j] = p_g^T (v_i o q_j) + b_g`` with ``p_g`` = row g of ``h_mat``.
      With ``weight_norm_h_mat`` (as in BiAttention) ``h_mat = h_mat_g h_mat_v / ||h_mat_v||``.
    * ``h_out`` > 32: the same through a weight-normalised linear layer ``h_net`` (memory-lean, slow).
    * ``h_out`` None: ``forward`` returns the joint representation (B, K, T, k * h_dim).

    ``forward_with_weights(v, q, w (B, K, T)) -> (B, h_dim)``: the bilinear attention network
    (eq. 5), ``f_k = sum_ij w_ij v_ik q_jk``, sum-pooled over the k rank groups (eq. 6).
    """

    def __init__(self, v_dim: int, q_dim: int, h_dim: int, h_out: Optional[int], act: str = "ReLU",
                 dropout: Sequence[float] = (0.2, 0.5), k: int = 3, weight_norm_h_mat: bool = False):
        super().__init__()
        self.c = 32
        self.k = k
        self.v_dim, self.q_dim, self.h_dim, self.h_out = v_dim, q_dim, h_dim, h_out
        self.v_net = FCNet([v_dim, h_dim * k], act=act, dropout=dropout[0])
        self.q_net = FCNet([q_dim, h_dim * k], act=act, dropout=dropout[0])
        self.dropout = nn.Dropout(dropout[1])  # on the attention's visual side
        self.weight_norm_h_mat = weight_norm_h_mat and h_out is not None and h_out <= self.c
        if h_out is None:
            pass
        elif h_out <= self.c:
            h_mat = torch.randn(1, h_out, 1, h_dim * k)
            if self.weight_norm_h_mat:
                self.h_mat_g = nn.Parameter(h_mat.norm().clone())
                self.h_mat_v = nn.Parameter(h_mat)
            else:
                self.h_mat = nn.Parameter(h_mat)
            self.h_bias = nn.Parameter(torch.randn(1, h_out, 1, 1))
        else:
            self.h_net = WeightNormLinear(h_dim * k, h_out)

    def projection(self) -> Tensor:
        """The attention vectors ``p_g`` as (h_out, k * h_dim)."""
        h_mat = _weight_norm(self.h_mat_g, self.h_mat_v) if self.weight_norm_h_mat else self.h_mat
        return h_mat[0, :, 0, :]

    def forward(self, v: Tensor, q: Tensor) -> Tensor:
        if self.h_out is None:
            return torch.einsum("bvk,bqk->bvqk", self.v_net(v), self.q_net(q))
        v_ = self.dropout(self.v_net(v))
        q_ = self.q_net(q)
        if self.h_out <= self.c:
            return torch.einsum("hk,bvk,bqk->bhvq", self.projection(), v_, q_) + self.h_bias
        joint = v_.unsqueeze(2) * q_.unsqueeze(1)  # (B, K, T, k h_dim)
        return self.h_net(joint).permute(0, 3, 1, 2)

    def forward_with_weights(self, v: Tensor, q: Tensor, w: Tensor) -> Tensor:
        v_ = self.v_net(v)
        q_ = self.q_net(q)
        f = torch.einsum("bvk,bvq,bqk->bk", v_, w, q_)
        if self.k > 1:  # sum pooling over groups of k consecutive units
            f = f.view(f.shape[0], -1, self.k).sum(-1)
        return f


class BiAttention(nn.Module):
    """G bilinear attention maps between boxes and question words (BAN paper eq. 9).

    ``forward_all(v (B, K, x_dim), q (B, T, y_dim)) -> (att (B, G, K, T), logits (B, G, K, T))``:
    ``att`` is a softmax over all K x T (box, word) pairs of each glimpse. Padded boxes
    (``v.abs().sum(2) == 0``) get logit ``mask_with`` (-inf), hence attention 0.
    """

    def __init__(self, x_dim: int, y_dim: int, z_dim: int, glimpse: int, dropout: Sequence[float] = (0.2, 0.5)):
        super().__init__()
        self.glimpse = glimpse
        self.logits = BCNet(x_dim, y_dim, z_dim, glimpse, dropout=dropout, k=3, weight_norm_h_mat=True)

    def forward(self, v: Tensor, q: Tensor, v_mask: bool = True) -> Tuple[Tensor, Tensor]:
        return self.forward_all(v, q, v_mask)

    def forward_all(self, v: Tensor, q: Tensor, v_mask: bool = True, logit: bool = False,
                    mask_with: float = float("-inf")):
        logits = self.logits(v, q)
        if v_mask:
            padded = padding_mask(v).logical_not()[:, None, :, None]
            logits = logits.masked_fill(padded, mask_with)
        if logit:
            return logits
        B, G, K, T = logits.shape
        att = torch.softmax(logits.reshape(B, G, K * T), dim=2).view(B, G, K, T)
        return att, logits


class WordEmbedding(nn.Module):
    """Word embeddings; index ``ntoken`` is padding. With ``'c' in op`` a second table ``emb_``
    (fixed GloVe, or tf-idf-weighted GloVe when trained) is concatenated: 2 x emb_dim features.
    ``forward(q (B, T) long) -> (B, T, emb_dim or 2 emb_dim)``."""

    def __init__(self, ntoken: int, emb_dim: int, dropout: float = 0.0, op: str = ""):
        super().__init__()
        self.op = op
        self.ntoken, self.emb_dim = ntoken, emb_dim
        self.emb = nn.Embedding(ntoken + 1, emb_dim, padding_idx=ntoken)
        if "c" in op:
            self.emb_ = nn.Embedding(ntoken + 1, emb_dim, padding_idx=ntoken)
            self.emb_.weight.requires_grad = False
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def init_embedding(self, weights: Union[str, Path, np.ndarray, Tensor], tfidf: Optional[Tensor] = None,
                       tfidf_weights: Optional[Union[np.ndarray, Tensor]] = None) -> None:
        """Initialise from GloVe ``weights`` (ntoken, emb_dim) (array, tensor or .npy path).

        With ``op`` 'c': ``emb_`` gets the same vectors (fixed), or, given ``tfidf`` (ntoken, ntoken')
        (sparse or dense, rows = the dictionary's words) and the GloVe vectors of the extra
        ``ntoken' - ntoken`` words ``tfidf_weights``, the tf-idf-weighted average ``tfidf @ [weights;
        tfidf_weights]``, and becomes trainable.
        """
        if isinstance(weights, (str, Path)):
            weights = np.load(weights)
        init = torch.as_tensor(np.asarray(weights) if not isinstance(weights, Tensor) else weights,
                               dtype=self.emb.weight.dtype)
        if init.shape != (self.ntoken, self.emb_dim):
            raise ValueError(f"weights must have shape (ntoken, emb_dim) = {(self.ntoken, self.emb_dim)}, "
                             f"got {tuple(init.shape)}")
        self.emb.weight[: self.ntoken] = init
        if "c" not in self.op:
            return
        if tfidf is not None:
            if tfidf_weights is not None and np.size(tfidf_weights) > 0:
                init = torch.cat([init, torch.as_tensor(np.asarray(tfidf_weights), dtype=init.dtype)], 0)
            init = tfidf.to(init.dtype).matmul(init) if not tfidf.is_sparse else torch.sparse.mm(tfidf.to(init.dtype), init)
            self.emb_.weight.requires_grad = True
        self.emb_.weight[: self.ntoken] = init

    def forward(self, q: Tensor) -> Tensor:
        emb = self.emb(q)
        if "c" in self.op:
            emb = torch.cat([emb, self.emb_(q)], 2)
        return self.dropout(emb)


class QuestionEmbedding(nn.Module):
    """GRU (or LSTM) question encoder. ``forward_all(x (B, T, in_dim)) -> (B, T, num_hid * directions)``,
    every step's output; ``forward(x) -> (B, num_hid * directions)`` the final one."""

    def __init__(self, in_dim: int, num_hid: int, nlayers: int = 1, bidirect: bool = False,
                 dropout: float = 0.0, rnn_type: str = "GRU"):
        super().__init__()
        if rnn_type not in ("GRU", "LSTM"):
            raise ValueError(f"rnn_type must be 'GRU' or 'LSTM', got {rnn_type!r}")
        rnn_cls = nn.GRU if rnn_type == "GRU" else nn.LSTM
        self.rnn = rnn_cls(in_dim, num_hid, nlayers, bidirectional=bidirect, dropout=dropout, batch_first=True)
        self.in_dim, self.num_hid, self.nlayers, self.rnn_type = in_dim, num_hid, nlayers, rnn_type
        self.ndirections = 1 + int(bidirect)

    def forward_all(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        out = self.forward_all(x)
        if self.ndirections == 1:
            return out[:, -1]
        return torch.cat([out[:, -1, : self.num_hid], out[:, 0, self.num_hid:]], 1)


class SimpleClassifier(nn.Module):
    """Answer classifier: WN-Linear -> ReLU -> Dropout -> WN-Linear. (B, in_dim) -> (B, out_dim) logits."""

    def __init__(self, in_dim: int, hid_dim: int, out_dim: int, dropout: float):
        super().__init__()
        # not in-place: autograd keeps the ReLU output for its backward (the official in-place
        # dropout fails on torch 2.x)
        self.main = nn.Sequential(WeightNormLinear(in_dim, hid_dim), nn.ReLU(), nn.Dropout(dropout),
                                  WeightNormLinear(hid_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def padding_mask(v: Tensor) -> Tensor:
    """(B, K) bool, True = real box. BAN's convention: a padded box has an all-zero feature row."""
    return v.abs().sum(2) != 0


def check_ban_inputs(v: Tensor, b: Tensor, q: Tensor, v_dim: Optional[int] = None) -> None:
    """ValueError naming the argument for inputs that do not fit BAN's (B, K, v_dim), (B, K, >=4), (B, T)."""
    if not isinstance(v, Tensor) or v.dim() != 3 or not v.is_floating_point():
        raise ValueError(f"v must be a float tensor (B, K, v_dim), got {_describe(v)}")
    if v_dim is not None and v.shape[2] != v_dim:
        raise ValueError(f"v must have v_dim = {v_dim} features, got shape {tuple(v.shape)}")
    if not isinstance(b, Tensor) or b.dim() != 3 or b.shape[:2] != v.shape[:2] or b.shape[2] < 4:
        raise ValueError(f"b must be a tensor (B, K, >=4) matching v {tuple(v.shape)}, got {_describe(b)}")
    if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[0] != v.shape[0] or q.is_floating_point():
        raise ValueError(f"q must be an integer tensor (B, T) with B = {v.shape[0]}, got {_describe(q)}")


def _describe(t) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def ban_attend(ban: nn.Module, v: Tensor, q: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Question encoding and the G bilinear attention maps, computed once before the glimpse loop.

    ``ban``: a BAN (official or ``BanModel``). Returns ``q_emb`` (B, T, H), ``att`` (B, G, K, T) and
    ``logits`` (B, G, K, T) (-inf at padded boxes).
    """
    q_emb = ban.q_emb.forward_all(ban.w_emb(q))
    att, logits = ban.v_att.forward_all(v, q_emb)
    return q_emb, att, logits


def ban_fuse(ban: nn.Module, v: Tensor, b: Tensor, q_emb: Tensor, att: Tensor, logits: Tensor,
             extra: Optional[Sequence[Tensor]] = None) -> Tensor:
    """The residual glimpse loop of BAN (paper eq. 11-12, counting as section 4.3) and the classifier.

    For glimpse g: ``q_emb += q_prj[g](BAN_g(v, q_emb; att_g))``, then ``q_emb += c_prj[g](count_g)``
    with the count from the top boxes of the glimpse's max-over-words attention logits, then, when
    given, ``q_emb += extra[g]`` ((B, H), broadcast over words; the hook used by the PO-U plugin).
    Returns answer logits (B, num_answers) from ``q_emb`` summed over words.
    """
    boxes = b[:, :, :4].transpose(1, 2)  # the counter's (B, 4, K) layout
    for g in range(ban.glimpse):
        b_emb = ban.b_net[g].forward_with_weights(v, q_emb, att[:, g])
        relevance = logits[:, g].max(2)[0]  # (B, K): max over words, as for counting (BAN sec. 4.3)
        count = ban.counter(boxes, relevance)
        q_emb = ban.q_prj[g](b_emb.unsqueeze(1)) + q_emb
        q_emb = q_emb + ban.c_prj[g](count).unsqueeze(1)
        if extra is not None:
            q_emb = q_emb + extra[g].unsqueeze(1)
    return ban.classifier(q_emb.sum(1))


class BanModel(nn.Module):
    """BAN for VQA. ``forward(v (B, K, v_dim), b (B, K, >=4), q (B, T), labels=None)
    -> (answer logits (B, num_answers), att (B, G, K, T))``; ``labels`` is ignored (official signature)."""

    def __init__(self, w_emb: WordEmbedding, q_emb: QuestionEmbedding, v_att: BiAttention,
                 b_net: Sequence[BCNet], q_prj: Sequence[FCNet], c_prj: Sequence[FCNet],
                 classifier: SimpleClassifier, counter: Counter, op: str, glimpse: int):
        super().__init__()
        self.op = op
        self.glimpse = glimpse
        self.w_emb = w_emb
        self.q_emb = q_emb
        self.v_att = v_att
        self.b_net = nn.ModuleList(b_net)
        self.q_prj = nn.ModuleList(q_prj)
        self.c_prj = nn.ModuleList(c_prj)
        self.classifier = classifier
        self.counter = counter

    def forward(self, v: Tensor, b: Tensor, q: Tensor, labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        check_ban_inputs(v, b, q, self.v_att.logits.v_dim)
        q_emb, att, logits = ban_attend(self, v, q)
        return ban_fuse(self, v, b, q_emb, att, logits), att


def build_ban(ntoken: int, num_ans_candidates: int, v_dim: int = 2048, num_hid: int = 1280,
              op: str = "c", gamma: int = 8) -> BanModel:
    """BAN-``gamma`` as the official ``build_ban(dataset, num_hid, op, gamma)`` builds it for VQA.

    Defaults are the official ``main.py``'s: H = 1280, op 'c' (600-d word input), G = 8 glimpses,
    the counter over the top 10 boxes.
    """
    for name, val in (("ntoken", ntoken), ("num_ans_candidates", num_ans_candidates), ("v_dim", v_dim),
                      ("num_hid", num_hid), ("gamma", gamma)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    objects = 10
    w_emb = WordEmbedding(ntoken, 300, 0.0, op)
    q_emb = QuestionEmbedding(600 if "c" in op else 300, num_hid, 1, False, 0.0)
    v_att = BiAttention(v_dim, num_hid, num_hid, gamma)
    b_net = [BCNet(v_dim, num_hid, num_hid, None, k=1) for _ in range(gamma)]
    q_prj = [FCNet([num_hid, num_hid], "", 0.2) for _ in range(gamma)]
    c_prj = [FCNet([objects + 1, num_hid], "ReLU", 0.0) for _ in range(gamma)]
    classifier = SimpleClassifier(num_hid, num_hid * 2, num_ans_candidates, 0.5)
    return BanModel(w_emb, q_emb, v_att, b_net, q_prj, c_prj, classifier, Counter(objects), op, gamma)
