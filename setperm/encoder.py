"""Modules: the permutation optimiser (PO-U, PO-LA, LinAssign, lattice) and the set encoder.

The modules hold parameters and call the functional core (cost, optimize, sinkhorn, assign).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .assign import LinearAssignment, apply_permutation, permutation_matrix
from .cost import PairwiseCost
from .masking import check_finite as _check_finite
from .masking import check_set, check_weights, resolve_mask, zero_padding
from .optimize import optimize_permutation, permutation_entropy
from .pairwise import check_kernel
from .sinkhorn import sinkhorn

_INIT_ALIASES = {"uniform": "uniform", "po-u": "uniform", "linear": "linear", "po-la": "linear"}


class PermutationOptimizer(nn.Module):
    """Permutation-Optimisation module (paper section 2, algorithm 1).

    Args:
        in_features: element dimension D.
        cost_hidden: hidden width(s) of the pairwise MLP f (paper F: 16 for sorting, 64/128 for
            mosaics, 128 for VQA).
        steps: number T of unrolled inner gradient steps (6 sorting, 4 mosaics, 3 VQA).
        init: ``"uniform"`` (PO-U, P~(0) = 0) or ``"linear"`` (PO-LA, P~(0)_ik = w_k . x_i, eq. 6).
            ``init="linear", steps=0`` is the LinAssign baseline of Mena et al. (2018).
        num_positions: number of position vectors for ``init="linear"`` (sets may have N <= it).
        grid: ``(R, Cols)`` to permute into a lattice (section 2.4) instead of a sequence;
            positions are row-major and ``N`` must equal ``R * Cols``.
        sinkhorn_iters: Sinkhorn rounds L per normalisation (appendix B: 4).
        temperature: Sinkhorn temperature (paper: 1).
        eta_init: initial step size eta (appendix F: 1.0). eta is learned and used as |eta|.
        cost_channels: cost matrices K (default 2 with a grid, else 1).
        logit_clip: clip linear-assignment logits to ``[-clip, clip]`` (paper F.3 uses 10).
        check_finite: raise on NaN/Inf in real elements (one reduction + host sync per call).
        kernel: evaluation of the pairwise MLP, ``"chunked"`` (default) or ``"compiled"``
            (torch.compile-fused, several times faster after a compilation of seconds on first
            use; needs a C++ compiler on CPU / Triton on CUDA), see :mod:`setperm.pairwise`.

    Shapes: ``forward(x (B, N, D), mask (B, N) | None, lengths (B,) | None) -> P (B, N, N)``,
    ``P[b, i, k]`` = weight of element i at position k. With ``return_steps=True`` the list of the
    T + 1 soft permutations along the optimisation is returned instead.
    """

    def __init__(self, in_features: int, cost_hidden: Union[int, Sequence[int]] = 16, steps: int = 6,
                 init: str = "uniform", num_positions: Optional[int] = None, grid: Optional[Tuple[int, int]] = None,
                 sinkhorn_iters: int = 4, temperature: float = 1.0, eta_init: float = 1.0,
                 cost_channels: Optional[int] = None, logit_clip: Optional[float] = None,
                 check_finite: bool = True, track_entropy: bool = False, kernel: str = "chunked"):
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not isinstance(init, str) or init.lower() not in _INIT_ALIASES:
            raise ValueError(f"init must be one of 'uniform' (PO-U) or 'linear' (PO-LA), got {init!r}")
        if sinkhorn_iters < 0:
            raise ValueError(f"sinkhorn_iters must be >= 0, got {sinkhorn_iters}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_kernel(kernel)
        if grid is not None:
            if len(grid) != 2 or int(grid[0]) < 1 or int(grid[1]) < 1:
                raise ValueError(f"grid must be (rows, cols) of positive ints, got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        self.init = _INIT_ALIASES[init.lower()]
        if self.init == "linear":
            if num_positions is None and grid is not None:
                num_positions = grid[0] * grid[1]
            if num_positions is None or num_positions < 1:
                raise ValueError("init='linear' (PO-LA / LinAssign) needs num_positions >= 1 "
                                 f"(a fixed number of positions), got {num_positions!r}")
        if cost_channels is None:
            cost_channels = 2 if grid is not None else 1
        if grid is not None and cost_channels != 2:
            raise ValueError(f"a lattice needs cost_channels=2 (horizontal, vertical), got {cost_channels}")
        self.in_features = in_features
        self.steps = steps
        self.grid = grid
        self.sinkhorn_iters = sinkhorn_iters
        self.temperature = float(temperature)
        self.check_finite = check_finite
        self.track_entropy = track_entropy
        self.last_entropy: Optional[Tensor] = None
        # The pairwise cost is only needed when there are inner steps (LinAssign has none).
        self.cost = PairwiseCost(in_features, cost_hidden, cost_channels, kernel=kernel) if steps > 0 else None
        self.linear = (LinearAssignment(in_features, num_positions, clip=logit_clip)
                       if self.init == "linear" else None)
        # Learned step size, used as |eta| like the paper's code so that it can pass through 0.
        # Without inner steps (LinAssign) there is no eta: an unused parameter would break DDP.
        self.eta_param = nn.Parameter(torch.tensor(float(eta_init))) if steps > 0 else None

    @property
    def eta(self) -> Optional[Tensor]:
        """The current positive step size eta (a 0-d tensor that carries gradient); None if steps == 0."""
        return None if self.eta_param is None else self.eta_param.abs()

    def _validate(self, x: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor]) -> Optional[Tensor]:
        check_set(x, features=self.in_features)
        mask = resolve_mask(x, mask, lengths)
        if self.grid is not None and x.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"grid {self.grid} has {self.grid[0] * self.grid[1]} positions but x has "
                             f"N={x.shape[1]} elements (shape {tuple(x.shape)})")
        if self.check_finite:
            _check_finite(x, mask)
        return mask

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                return_steps: bool = False) -> Union[Tensor, List[Tensor]]:
        mask = self._validate(x, mask, lengths)
        return self._permute(zero_padding(x, mask), mask, return_steps)

    def _permute(self, x: Tensor, mask: Optional[Tensor], return_steps: bool = False):
        """``x`` already validated with its padding zeroed."""
        init_logits = self.linear(x) if self.linear is not None else None
        if self.cost is None:
            logits = init_logits if init_logits is not None else x.new_zeros(x.shape[0], x.shape[1], x.shape[1])
            P = sinkhorn(logits, mask=mask, iters=self.sinkhorn_iters, temperature=self.temperature)
            out: Union[Tensor, List[Tensor]] = [P] if return_steps else P
        else:
            C = self.cost(x, mask)
            out = optimize_permutation(C, init_logits, eta=self.eta, steps=self.steps, mask=mask,
                                       sinkhorn_iters=self.sinkhorn_iters, temperature=self.temperature,
                                       grid=self.grid, return_steps=return_steps)
        if self.track_entropy:
            final = out[-1] if isinstance(out, list) else out
            with torch.no_grad():
                self.last_entropy = permutation_entropy(final.float(), mask).mean()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, steps={self.steps}, init={self.init!r}, grid={self.grid}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, temperature={self.temperature}")


class LinAssign(PermutationOptimizer):
    """The LinAssign baseline (Mena et al. 2018 as described in the paper): a per-element linear
    map to positions, Sinkhorn-normalised; PO-LA with T = 0. Shapes as ``PermutationOptimizer``."""

    def __init__(self, in_features: int, num_positions: int, sinkhorn_iters: int = 4, temperature: float = 1.0,
                 logit_clip: Optional[float] = None, grid: Optional[Tuple[int, int]] = None, check_finite: bool = True):
        super().__init__(in_features, steps=0, init="linear", num_positions=num_positions, grid=grid,
                         sinkhorn_iters=sinkhorn_iters, temperature=temperature, logit_clip=logit_clip,
                         check_finite=check_finite)


def _xavier_lstm_(lstm: nn.LSTM) -> None:
    """Xavier init per gate block and zero biases (paper appendix F)."""
    for name, p in lstm.named_parameters():
        if "weight" in name:
            for chunk in p.data.chunk(4, dim=0):
                nn.init.xavier_uniform_(chunk)
        else:
            nn.init.zeros_(p)


_PERMUTATIONS = ("po-u", "po-la", "none")


class PermutationSetEncoder(nn.Module):
    """Permutation-invariant set encoder: PO permutes the set, an LSTM reads the sequence, and
    the LSTM's last cell state is the set representation (paper section 4.4, appendix F.4).

    Args:
        in_features: element dimension D.
        hidden_size: LSTM units (the output size).
        cost_hidden: hidden width of the pairwise MLP f.
        steps: inner optimisation steps T.
        permutation: ``"po-u"`` (default), ``"po-la"`` (needs ``num_positions``) or ``"none"``: no
            permutation, the paper's "BAN + LSTM" baseline (elements read in input order, which
            is not permutation invariant).
        sinkhorn_iters, temperature, eta_init, num_positions, check_finite, kernel: as in
            :class:`PermutationOptimizer`.

    Shapes:
        ``forward(x (B, N, D), mask (B, N) | None, lengths (B,) | None, weights (B, N) | None)
        -> h (B, hidden_size)``; with ``return_permutation=True`` -> ``(h, P (B, N, N))``.
        ``weights`` are relevance logits: each element is scaled by ``sigmoid(weights)`` before
        the LSTM (F.4); the ordering cost sees the unscaled elements. The LSTM reads only the n
        real elements (packed sequence), so padding has no influence; an empty set gives 0.
    """

    def __init__(self, in_features: int, hidden_size: int = 128, cost_hidden: Union[int, Sequence[int]] = 128,
                 steps: int = 3, permutation: str = "po-u", sinkhorn_iters: int = 4, temperature: float = 1.0,
                 eta_init: float = 1.0, num_positions: Optional[int] = None, check_finite: bool = True,
                 kernel: str = "chunked"):
        super().__init__()
        if not isinstance(permutation, str) or permutation.lower() not in _PERMUTATIONS:
            raise ValueError(f"permutation must be one of {_PERMUTATIONS}, got {permutation!r}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.permutation = permutation.lower()
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.check_finite = check_finite
        self.permute = None
        if self.permutation != "none":
            self.permute = PermutationOptimizer(
                in_features, cost_hidden=cost_hidden, steps=steps,
                init="uniform" if self.permutation == "po-u" else "linear", num_positions=num_positions,
                sinkhorn_iters=sinkhorn_iters, temperature=temperature, eta_init=eta_init, check_finite=False,
                kernel=kernel)
        elif not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.lstm = nn.LSTM(in_features, hidden_size, batch_first=True)
        _xavier_lstm_(self.lstm)

    @property
    def eta(self) -> Optional[Tensor]:
        """The permutation optimiser's step size (None for ``permutation="none"`` or ``steps=0``)."""
        return None if self.permute is None else self.permute.eta

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, return_permutation: bool = False):
        check_set(x, features=self.in_features)
        mask = resolve_mask(x, mask, lengths)
        check_weights(x, weights)
        if self.check_finite:
            _check_finite(x, mask)
            if weights is not None:
                _check_finite(weights.unsqueeze(-1), mask, name="weights")
        B, N, _ = x.shape
        x = zero_padding(x, mask)
        P: Optional[Tensor] = None
        order: Optional[Tensor] = None
        if self.permute is not None:
            P = self.permute._permute(x, mask)
        elif mask is not None:
            # "LSTM only": keep the input order of the real elements, padding moved to the end
            # (a gather, not a matmul with the equivalent permutation matrix).
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        if weights is not None:
            x = x * torch.sigmoid(zero_padding(weights.unsqueeze(-1), mask))
        if P is not None:
            seq = apply_permutation(x, P)
        elif order is not None:
            seq = x.gather(1, order.unsqueeze(-1).expand_as(x))
        else:
            seq = x
        if mask is None:
            _, (_, c_n) = self.lstm(seq)
            h = c_n[-1]
        else:
            n = mask.sum(1)
            packed = pack_padded_sequence(seq, n.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
            _, (_, c_n) = self.lstm(packed)
            h = torch.where((n > 0).unsqueeze(1), c_n[-1], torch.zeros((), dtype=c_n.dtype, device=c_n.device))
        if return_permutation:
            if P is None:
                P = (permutation_matrix(order, dtype=x.dtype) if order is not None
                     else torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N))
            return h, P
        return h

    def extra_repr(self) -> str:
        return f"permutation={self.permutation!r}"
