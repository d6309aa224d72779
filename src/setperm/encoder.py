"""Modules: the Permutation-Optimisation module (PO-U, PO-LA, lattice), LinAssign and the set encoder.

The modules hold parameters and call the functional core (:mod:`setperm.functional`). The
variants of PO are named by ``permutation=``: ``"po-u"`` (uniform start, paper eq. 6 left) and
``"po-la"`` (linear-assignment start, eq. 6 right); the baseline of Mena et al. 2018 (PO-LA with
T = 0 steps) is its own module, :class:`LinAssign`.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from ._compat import autocast_enabled, autocast_off, is_compiling
from ._errors import check_int, check_positive, check_same_device, registered_hooks, user_stacklevel
from .assign import LinearAssignmentLogits, apply_permutation, hungarian, permutation_matrix
from .cost import PairwiseCost, hidden_widths
from .init import uninitialized, xavier_linear_, xavier_rnn_
from .masking import (check_check_finite, check_dtype, check_module_device, check_set, check_weights, host_decisions,
                      module_dtype, resolve_check_finite, resolve_mask, zero_padding)
from .masking import check_finite as _check_finite
from .optimize import DEFAULT_STEPS, check_grid, optimize_permutation
from .pairwise import build_error_cause, check_kernel
from .sinkhorn import sinkhorn

PERMUTATIONS = ("po-u", "po-la")
POOLS = ("sum", "mean", "attention")
RNNS = ("lstm", "gru")
# the ways last_state reads the recurrent reader (the encoder's read=)
READS = ("auto", "packed", "grouped", "padded", "fused")


def _check_permutation(permutation: str) -> str:
    if not isinstance(permutation, str) or permutation not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {PERMUTATIONS} (LinAssign is its own module), "
                         f"got {permutation!r}")
    return permutation


def _repr(pairs) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in pairs)


class PermutationOptimization(nn.Module):
    """Permutation-Optimisation module, PO (paper section 2, algorithm 1).

    Args:
        in_features: element dimension D.
        cost_hidden: hidden width(s) of the pairwise MLP f (paper F: 16 for sorting, 64/128 for
            mosaics, 128 for VQA).
        steps: number T of unrolled inner gradient steps (default 4 as the paper's mosaics; it
            uses 6 for sorting and 3 for VQA). ``steps=0`` with ``"po-la"`` is :class:`LinAssign`.
        permutation: ``"po-u"`` (P~(0) = 0, uniform P) or ``"po-la"`` (P~(0)_ik = w_k . x_i, eq. 6).
        num_positions: number of position vectors of ``"po-la"`` (sets may have N <= it; default
            with a grid: R * Cols). Not used by ``"po-u"``.
        sinkhorn_iters: Sinkhorn rounds L per normalisation (appendix B: 4).
        temperature: Sinkhorn temperature (paper: 1).
        eta_init: initial step size eta, a finite number > 0 (appendix F: 1.0). eta is learned
            and used as |eta|.
        logit_clip: clip ``"po-la"``'s linear-assignment logits to ``[-clip, clip]`` (paper F.3 uses
            10); ``"po-u"`` starts from zero logits (a value is refused).
        grid: ``(R, Cols)`` to permute into a lattice (section 2.4) instead of a sequence;
            positions are row-major and ``N`` must equal ``R * Cols``.
        cost_channels: cost matrices K (default 2 with a grid, else 1).
        check_finite: raise on NaN/Inf in real elements (one reduction + host sync per call).
            None (default): on the CPU only, where the synchronisation costs nothing; on CUDA the
            check would stall the launch queue on every call, so there it runs only when True.
        kernel: evaluation of the pairwise MLP, ``"auto"`` (default: ``"fused"`` on CUDA,
            ``"chunked"`` elsewhere), ``"chunked"`` or ``"compiled"`` (torch.compile-fused pairwise
            MLP, faster after a one-off compilation on first use; needs a C++ compiler on CPU /
            Triton on CUDA), see :mod:`setperm.pairwise`; measured speed-ups in
            ``benchmarks/README.md``. ``"fused"``: ``"compiled"``, and on CUDA the unrolled
            optimisation as two Triton kernels (:mod:`setperm.fused`; sets of up to 128 elements).
        device, dtype: where and in which dtype to create the parameters (as ``nn.Linear``).

    All arguments after ``in_features`` are keyword-only. Functional form:
    :func:`setperm.functional.optimize_permutation` (on a cost from
    :func:`setperm.functional.pairwise_cost`).

    Shapes: ``forward(x (B, N, D), mask (B, N) | None, lengths (B,) | None, return_steps=False, *,
    key_padding_mask (B, N) | None) -> P (B, N, N)``, ``P[b, i, k]`` = weight of element i at
    position k. ``mask`` is True at real elements, ``key_padding_mask`` True at padding (as in
    ``nn.MultiheadAttention``), ``lengths`` gives prefix padding; pass at most one. With
    ``return_steps=True`` the list of the T + 1 soft permutations along the optimisation is
    returned instead. ``x`` must have the parameters' dtype (any half/float32 mix under
    ``torch.autocast``). B = 0 or N = 0 give an empty ``P``.
    """

    def __init__(self, in_features: int, *, cost_hidden: Union[int, Sequence[int]] = 16, steps: int = DEFAULT_STEPS,
                 permutation: str = "po-u", num_positions: Optional[int] = None, sinkhorn_iters: int = 4,
                 temperature: float = 1.0, eta_init: float = 1.0, logit_clip: Optional[float] = None,
                 grid: Optional[Tuple[int, int]] = None, cost_channels: Optional[int] = None,
                 check_finite: Optional[bool] = None, kernel: str = "auto", device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        in_features = check_int(in_features, "in_features", 1)
        check_check_finite(check_finite)
        self.permutation = _check_permutation(permutation)
        steps = check_int(steps, "steps")
        sinkhorn_iters = check_int(sinkhorn_iters, "sinkhorn_iters")
        temperature = check_positive(temperature, "temperature")
        if logit_clip is not None:
            logit_clip = check_positive(logit_clip, "logit_clip")
        check_kernel(kernel)
        grid = check_grid(grid)
        # > 0: at eta = 0 the derivative of |eta| is 0, so a step size started there never moves
        eta_init = check_positive(eta_init, "eta_init", finite=True)
        linear = permutation == "po-la"
        if linear:
            if num_positions is None and grid is not None:
                num_positions = grid[0] * grid[1]
            if num_positions is None:
                raise ValueError(f"permutation={permutation!r} needs num_positions >= 1 (a fixed number of "
                                 f"positions), got {num_positions!r}")
            num_positions = check_int(num_positions, "num_positions", 1)
            if grid is not None and num_positions < grid[0] * grid[1]:
                # a lattice's sets have exactly R * Cols elements, one position vector each
                raise ValueError(f"num_positions={num_positions} is fewer than the {grid[0] * grid[1]} positions of "
                                 f"grid {grid}: give num_positions >= {grid[0] * grid[1]}")
        elif logit_clip is not None:
            # PO-U starts every set from zero logits and clips none of its inner logits: a clip that
            # would be dropped silently is refused instead
            raise ValueError(f"logit_clip applies to permutation='po-la' (its linear-assignment start logits), "
                             f"not to {self.permutation!r}: got logit_clip={logit_clip!r}")
        if cost_channels is None:
            cost_channels = 2 if grid is not None else 1
        if grid is not None and cost_channels != 2:
            raise ValueError(f"a lattice needs cost_channels=2 (horizontal, vertical), got {cost_channels}")
        self.in_features = in_features
        widths = hidden_widths(cost_hidden, "cost_hidden")
        self.cost_hidden = widths if isinstance(cost_hidden, Sequence) else widths[0]
        self.steps = steps
        self.num_positions = num_positions if linear else None
        self.grid = grid
        self.sinkhorn_iters = sinkhorn_iters
        self.temperature = float(temperature)
        self.eta_init = float(eta_init)
        self.cost_channels = cost_channels
        self.logit_clip = logit_clip if linear else None
        self.check_finite = check_finite
        self._kernel = kernel
        # The pairwise cost is only needed when there are inner steps (LinAssign has none).
        self.cost = (PairwiseCost(in_features, self.cost_hidden, channels=cost_channels, kernel=kernel, **factory_kwargs)
                     if steps > 0 else None)
        self.linear = (LinearAssignmentLogits(in_features, num_positions, clip=logit_clip, **factory_kwargs)
                       if linear else None)
        # Learned step size, used as |eta| like the paper's code so that it can pass through 0.
        # Without inner steps (LinAssign) there is no eta: an unused parameter would break DDP.
        self.eta_param = nn.Parameter(torch.empty((), **factory_kwargs)) if steps > 0 else None
        # cost and linear initialised themselves (in this order, as reset_parameters does)
        self._reset_eta()

    def reset_parameters(self) -> None:
        """Xavier weights and zero biases (appendix F), eta = ``eta_init``; draws the same random
        numbers as construction, so under the same seed it reproduces a fresh module."""
        if self.cost is not None:
            self.cost.reset_parameters()
        if self.linear is not None:
            self.linear.reset_parameters()
        self._reset_eta()

    def _reset_eta(self) -> None:
        if self.eta_param is not None:
            with torch.no_grad():
                self.eta_param.fill_(self.eta_init)

    @property
    def kernel(self) -> str:
        """The pairwise MLP's kernel (that of ``self.cost``, which may be switched after building)."""
        return self.cost.kernel if self.cost is not None else self._kernel

    @property
    def eta(self) -> Optional[Tensor]:
        """The current positive step size eta (a 0-d tensor that carries gradient); None if steps == 0."""
        return None if self.eta_param is None else self.eta_param.abs()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                return_steps: bool = False, *, key_padding_mask: Optional[Tensor] = None
                ) -> Union[Tensor, List[Tensor]]:
        check_set(x, features=self.in_features)
        check_module_device(x, self)
        check_dtype(x, module_dtype(self))
        mask = resolve_mask(x, mask, lengths, key_padding_mask)
        if self.grid is not None and x.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"grid {self.grid} has {self.grid[0] * self.grid[1]} positions but x has "
                             f"N={x.shape[1]} elements (shape {tuple(x.shape)})")
        if resolve_check_finite(self.check_finite, x):
            _check_finite(x, mask)
        init_logits = None
        if self.linear is not None:
            # zeroed first: the linear map's backward multiplies each padded element by its zero
            # gradient, and NaN * 0 is NaN (the cost zeroes the padding itself)
            init_logits = self.linear(zero_padding(x, mask))
        if self.cost is None:
            logits = init_logits if init_logits is not None else x.new_zeros(x.shape[0], x.shape[1], x.shape[1])
            P = sinkhorn(logits, mask=mask, iters=self.sinkhorn_iters, temperature=self.temperature)
            return [P] if return_steps else P
        C = self.cost(x, mask)
        return optimize_permutation(C, init_logits, eta=self.eta, steps=self.steps, mask=mask,
                                    sinkhorn_iters=self.sinkhorn_iters, temperature=self.temperature,
                                    grid=self.grid, return_steps=return_steps, kernel=self.kernel)

    def extra_repr(self) -> str:
        pairs = [("in_features", self.in_features), ("permutation", self.permutation), ("steps", self.steps)]
        if self.cost is not None:
            pairs += [("cost_hidden", self.cost_hidden), ("cost_channels", self.cost_channels),
                      ("eta_init", self.eta_init), ("kernel", self.kernel)]
        if self.linear is not None:
            pairs += [("num_positions", self.num_positions), ("logit_clip", self.logit_clip)]
        pairs += [("grid", self.grid), ("sinkhorn_iters", self.sinkhorn_iters), ("temperature", self.temperature),
                  ("check_finite", self.check_finite)]
        return _repr(pairs)


class LinAssign(PermutationOptimization):
    """The LinAssign baseline (Mena et al. 2018 as described in the paper): a per-element linear
    map to positions, Sinkhorn-normalised, with no pairwise cost and no eta; PO-LA with T = 0
    inner steps (``permutation`` reads ``"linassign"``, ``steps`` 0).

    Args:
        in_features: element dimension D.
        num_positions: number of position vectors (sets may have N <= it).
        sinkhorn_iters, temperature, logit_clip, grid, check_finite, device, dtype: as in
            :class:`PermutationOptimization` (keyword-only).

    Shapes as :class:`PermutationOptimization`.
    """

    def __init__(self, in_features: int, num_positions: int, *, sinkhorn_iters: int = 4, temperature: float = 1.0,
                 logit_clip: Optional[float] = None, grid: Optional[Tuple[int, int]] = None,
                 check_finite: Optional[bool] = None, device=None, dtype=None):
        super().__init__(in_features, steps=0, permutation="po-la", num_positions=num_positions,
                         sinkhorn_iters=sinkhorn_iters, temperature=temperature, logit_clip=logit_clip, grid=grid,
                         check_finite=check_finite, device=device, dtype=dtype)
        self.permutation = "linassign"


def last_state(rnn: nn.RNNBase, seq: Tensor, lengths: Tensor, method: str = "auto",
               host_lengths: Optional[Tensor] = None) -> Tensor:
    """The last layer's final state after reading the first ``lengths[b]`` steps of each sequence:
    an LSTM's cell state ``c_n[-1]`` (the paper's set representation), a GRU's hidden state
    ``h_n[-1]`` (a GRU has no cell state).

    Args:
        rnn: a batch-first ``nn.LSTM`` or ``nn.GRU``.
        seq: (B, N, D) sequences, the real steps first.
        lengths: (B,) int, 0 <= lengths <= N; a sequence of length 0 gives a zero state.
        method: ``"packed"`` (one call on a packed sequence), ``"grouped"`` (one call per distinct
            length on the sequences of that length, no padding read), ``"padded"`` (one call on the
            whole batch, padding zeroed, each sequence's state kept from its own last step on: no
            length is needed on the host; a one-layer, one-directional reader only; an LSTM's
            padded steps hold its cell state through an extra input column, so the call is made
            with its weights, not through the module, and hooks registered on it do not run),
            ``"fused"`` (an LSTM of up to 128 units on CUDA: the recurrence as two Triton kernels
            that stop at each sequence's length and read the lengths on the device,
            :mod:`setperm.fused_read`; with its weights, as padded; a one-layer, one-directional
            ``nn.LSTM`` without projections only; where the kernels do not apply, on the CPU or
            under ``torch.compile``, as ``"auto"``; where Triton is missing or cannot build them,
            the padded read, warned once) or ``"auto"``: on the CPU the method that
            :func:`read_costs` expects to be fastest for
            these sizes (grouped for a deeper or bidirectional reader; not padded for an LSTM with
            hooks); elsewhere and under ``torch.compile``
            packed when ``host_lengths`` are given, else padded (packed for a deeper or
            bidirectional reader). All compute the same recurrences; on the CPU an LSTM on a packed
            batch of unequal lengths leaves the fused kernel, and its backward zero-fills a
            full-size gradient buffer at every step, while cuDNN runs packed batches natively.
        host_lengths: the same lengths as a CPU tensor, when the caller has them: a packed sequence
            takes its lengths on the host, and copying device lengths there synchronises.
    Returns:
        (B, hidden_size) final state.
    """
    if method not in READS:
        raise ValueError(f"method: expected one of {READS}, got {method!r}")
    one_layer = rnn.num_layers == 1 and not rnn.bidirectional
    if method in ("padded", "fused") and not one_layer:
        raise ValueError(f"method={method!r} reads a one-layer, one-directional reader, got num_layers="
                         f"{rnn.num_layers}, bidirectional={rnn.bidirectional}")
    if method == "fused":
        if not isinstance(rnn, nn.LSTM) or rnn.proj_size > 0:
            raise ValueError(f"method='fused' reads an nn.LSTM without projections, got {type(rnn).__name__}"
                             + (f" with proj_size={rnn.proj_size}" if isinstance(rnn, nn.LSTM) else ""))
        if not fused_read_applies(rnn, seq):
            method = "auto"
        else:
            state = _fused_final_state(rnn, seq, lengths)
            if state is not None:
                return state
            method = "padded"                    # (the kernels could not run: warned)
    if method == "auto":
        method = auto_method(rnn, seq, lengths, host_lengths)
    if method == "padded":
        return _padded_final_state(rnn, seq, lengths)
    distinct = torch.unique(lengths).tolist() if method == "grouped" else []   # one host sync, like .cpu() below
    if method == "packed" or distinct == [0]:
        # (all sets empty: the packed call keeps the output connected to the LSTM's parameters)
        cpu_lengths = host_lengths if host_lengths is not None else lengths.cpu()   # (a sync unless given)
        # Sorted by length on the host, as pack_padded_sequence(enforce_sorted=False) would, but with
        # the orders copied to the device asynchronously: its own blocking copy would synchronise.
        sorted_lengths, order = torch.sort(cpu_lengths.clamp_min(1), descending=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        order_d, inverse_d = (t.to(seq.device, non_blocking=True) for t in (order, inverse))
        packed = pack_padded_sequence(seq.index_select(0, order_d), sorted_lengths, batch_first=True)
        state = _final_state(rnn(packed))
        return torch.where((lengths > 0).unsqueeze(1), state.index_select(0, inverse_d), 0.0)
    out = seq.new_zeros(seq.shape[0], rnn.hidden_size)
    for length in distinct:
        if length == 0:
            continue                                     # empty sets keep the zero state
        rows = (lengths == length).nonzero().squeeze(1)
        out = out.index_copy(0, rows, _final_state(rnn(seq[rows, :length])))
    return out


# The cost model of last_state's "auto" on the CPU: fwd+bwd nanoseconds on one thread, fitted to the
# timings of `python -m benchmarks.internals --readout` (benchmarks/README.md, "The LSTM read on the CPU").
# (call: one reader call, with its gathers and scatters; step: one time step of the fused CPU kernel;
# row: one row through one time step, per H (H + D) of the reader; packed_step: one time step of a
# packed batch, outside the fused kernel; zero: packed, the (N, B, H) gradient buffer backward
# zero-fills at each step, per N^2 B H)
READ_COSTS_NS = {"call": 530e3, "step": 4.8e3, "row": 0.43, "packed_step": 85e3, "zero": 0.92}


def read_cost_model(c: dict, H: int, D: int, B: int, n: int, k: int, S: int, R: int, threads: int) -> dict:
    """:func:`read_costs`' formula for the constants ``c`` (as :data:`READ_COSTS_NS`), ``H`` units,
    ``D`` inputs, ``B`` rows padded to ``n`` steps, ``k`` distinct non-zero lengths summing to ``S``,
    ``R`` real steps in all (also what ``benchmarks.internals`` fits the constants with)."""
    row = c["row"] * H * (H + D) / threads
    return {"grouped": k * c["call"] + S * c["step"] + R * row,
            "padded": c["call"] + n * c["step"] + B * n * c["row"] * H * (H + D + 1) / threads,
            "packed": c["call"] + n * c["packed_step"] + R * row + c["zero"] * n * n * B * H / threads}


def read_costs(rnn: nn.RNNBase, lengths: Tensor, n: int, threads: Optional[int] = None) -> dict:
    """Estimated fwd+bwd nanoseconds of :func:`last_state`'s three methods on the CPU, for ``lengths``
    (a CPU tensor) padded to ``n`` steps and ``threads`` threads (default: torch's; the model was
    measured with one and two, and counts more as two), from a cost model fitted to the measured
    times (``python -m benchmarks.internals --readout``; how often it picks the fastest method is in
    benchmarks/README.md, "The LSTM read on the CPU").

    With ``k`` distinct non-zero lengths summing to ``S``, ``R`` real steps in all, ``B`` rows,
    ``H`` units and ``D`` inputs, each method pays a per-call and a per-step overhead, which threads
    do not share, and arithmetic, which they do:

    * grouped: ``k`` calls and ``S`` steps (every size reads its own steps), ``R`` rows of arithmetic;
    * padded: one call and ``n`` steps, but ``B n`` rows of arithmetic (the padding is read, with
      one more input, the column that holds the cell there);
    * packed: one call and ``n`` steps, each outside the fused kernel (about 20x dearer), ``R`` rows,
      and a zero-filled ``(n, B, H)`` gradient buffer at every step of backward (``n^2 B H``).

    So many distinct sizes (``S`` much larger than ``n``) favour padded when the padding's arithmetic
    is cheap (a small ``B H^2``) and packed when ``n`` is small; grouped wins when a batch has few
    sizes, or when the reader is wide and the batch large. Measured with an LSTM; a GRU is read the
    same way.
    """
    # measured with one and two threads: more are counted as two (small products scale poorly)
    threads = min(max(threads if threads is not None else torch.get_num_threads(), 1), 2)
    B = lengths.numel()
    H, D = rnn.hidden_size, rnn.input_size
    distinct = torch.unique(lengths)
    distinct = distinct[distinct > 0]
    k, S, R = distinct.numel(), int(distinct.sum()), int(lengths.sum())
    return read_cost_model(READ_COSTS_NS, H, D, B, n, k, S, R, threads)


def auto_method(rnn: nn.RNNBase, seq: Tensor, lengths: Tensor, host_lengths: Optional[Tensor] = None,
                threads: Optional[int] = None) -> str:
    """The method :func:`last_state` takes for ``method="auto"`` on these arguments (``threads``:
    default torch's): on the CPU the cheapest by :func:`read_costs` (grouped on a tie, and for a
    deeper or bidirectional reader, for which the model was not measured), not padded for an LSTM
    with hooks registered on it (the padded read does not call it)."""
    one_layer = rnn.num_layers == 1 and not rnn.bidirectional
    # (under torch.compile's tracing the grouped loop's data-dependent sizes would break the graph;
    # off the CPU, copying device lengths to the host for a packed sequence would synchronise)
    if not host_decisions(seq):
        return "packed" if host_lengths is not None or not one_layer else "padded"
    if not one_layer:
        return "grouped"
    costs = read_costs(rnn, host_lengths if host_lengths is not None else lengths, seq.shape[1], threads)
    hooked = isinstance(rnn, nn.LSTM) and registered_hooks(rnn)         # (the padded read would not run them)
    methods = ("grouped", "packed") if hooked else ("grouped", "padded", "packed")
    return min(methods, key=costs.__getitem__)


# The logit that holds an LSTM's cell across padded steps (:func:`_padded_final_state`): added to the
# forget gate and subtracted from the input gate there. At most float16's largest finite 65,504,
# because cuDNN reads an LSTM in float16 under autocast; sigmoid(-60,000 + r) = 0 and
# sigmoid(60,000 + r) = 1 exactly in every dtype for any recurrent part |r| < 59,000.
_HOLD_LOGIT = 6.0e4


def _padded_final_state(rnn: nn.RNNBase, seq: Tensor, lengths: Tensor) -> Tensor:
    """:func:`last_state` by one call on the padded batch, without reading ``lengths`` on the host.
    Padding is zeroed first, so that it keeps the run finite (a non-finite step would turn the zero
    gradients that flow back through it into NaN); the steps before each length do not depend on
    it. A GRU's state is its output at the last step, gathered there.

    An LSTM returns only its cell state at the end, so the padded steps are made to hold it: the
    input gains one column, 1 at padded steps and 0 at real ones, whose weight is
    :data:`_HOLD_LOGIT` into the forget gate and minus it into the input gate (rows ``[H, 2H)`` and
    ``[0, H)`` of ``weight_ih``; constants, not parameters). At a padded step ``f = 1`` and ``i = 0``
    exactly, so ``c_t = 1 * c_{t-1} + 0 * g_t = c_{t-1}`` bit for bit, and the state the LSTM
    returns after all ``N`` steps is each sequence's cell state at its own length (0 for length
    0); the saturated gates have zero derivatives, so padded steps add nothing to any gradient. At
    real steps the column is 0 and the arithmetic is the reader's own. One fused LSTM call (cuDNN on
    CUDA) with the reader's weights, the extra column appended: it reads the reader's parameters
    and does not call the module, so hooks registered on it do not run (a warning says so)."""
    B, N = seq.shape[:2]
    real = (torch.arange(N, device=seq.device) < lengths.unsqueeze(1)).unsqueeze(-1)      # (B, N, 1)
    seq = torch.where(real, seq, 0.0)
    if isinstance(rnn, nn.GRU):
        out = rnn(seq)[0]                                              # (B, N, H): h_t of every step
        last = (lengths - 1).clamp_min(0).view(B, 1, 1)               # (a length-0 row is masked below)
        h = out.gather(1, last.expand(B, 1, out.shape[-1])).squeeze(1)
        return torch.where((lengths > 0).unsqueeze(1), h, 0.0)
    _warn_hooks(rnn, "padded")
    H = rnn.hidden_size
    w_ih = rnn.weight_ih_l0
    # (concatenated in their own dtypes, as autocast leaves them to the LSTM call: its cat would
    # promote them, and CPU autocast refuses float16 there)
    with autocast_off(seq.device.type):
        # made by fills on the device (torch.tensor(..., device=) would copy from the host and wait)
        hold = torch.cat([w_ih.new_full((H, 1), -_HOLD_LOGIT), w_ih.new_full((H, 1), _HOLD_LOGIT),
                          w_ih.new_zeros(2 * H, 1)])
        w_held = torch.cat([w_ih, hold], 1)                                      # (4H, D + 1)
        held = torch.cat([seq, (~real).to(seq.dtype)], -1)                       # (B, N, D + 1)
    names = (["weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if rnn.bias else [])
             + (["weight_hr_l0"] if rnn.proj_size > 0 else []))
    weights = [w_held] + [getattr(rnn, name) for name in names]
    state = (seq.new_zeros(1, B, rnn.proj_size or H), seq.new_zeros(1, B, H))

    def read() -> Tensor:
        # (torch.lstm: what nn.LSTM.forward calls, with the same autocast and device rules)
        return torch.lstm(held, state, weights, rnn.bias, 1, 0.0, rnn.training, False, True)[2][0]
    if seq.device.type != "cuda":
        return read()
    # cuDNN copies weights that are not one flat buffer into one at each call and warns that the
    # module should flatten them: here they are the (4H, D + 1 + H) matrices, made anew at each call
    # anyway, so the warning would name a fault that is not the user's. (Only where cuDNN runs:
    # catch_warnings swaps the process's filters, which threads share.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
        return read()


def _warn_hooks(rnn: nn.RNNBase, read: str) -> None:
    """A read that uses the reader's weights without calling it names the hooks that do not run."""
    hooks = registered_hooks(rnn)
    if hooks:
        warnings.warn(f"setperm: the {read} LSTM read uses the reader's weights and does not call the reader, so the "
                      f"{' and '.join(hooks)} registered on it do not run; a weight that such a hook recomputes "
                      "(torch.nn.utils.prune, torch.nn.utils.weight_norm / spectral_norm) is not updated. Lengths "
                      "on the host (a CPU tensor) read it packed, which calls it; torch.nn.utils.parametrize "
                      "applies to either", RuntimeWarning, stacklevel=user_stacklevel())


def fused_read_applies(rnn: nn.RNNBase, seq: Tensor) -> bool:
    """Whether :func:`last_state`'s ``method="fused"`` runs its kernels for ``seq``
    (:func:`setperm.fused_read.applies`, imported on first use)."""
    if is_compiling():
        return False          # (a compiled graph reads as "auto" does: nothing imported or read from the environment)
    from . import fused_read

    return fused_read.applies(rnn, seq)


def _fused_final_state(rnn: nn.LSTM, seq: Tensor, lengths: Tensor) -> Optional[Tensor]:
    """:func:`last_state` by :mod:`setperm.fused_read`'s kernels, where they apply
    (:func:`fused_read_applies`), or None where they cannot run (why is warned once)."""
    from . import fused_read

    reason = fused_read.failure(rnn, seq)
    if reason is None:
        _warn_hooks(rnn, "fused")
        try:
            return fused_read.lstm_final_cell(rnn, seq, lengths)
        except fused_read.KernelFailure as failure:
            reason = str(failure)
    fused_read.warn_fallback(reason)
    return None


def _pool_elements(x: Tensor, mask: Optional[Tensor], how: str, gate: Optional[nn.Module]) -> Tensor:
    """``x (B, N, D)``, zero at padding, pooled over the real elements -> ``(B, D)``: their sum, mean
    (an empty set gives 0), or ``"attention"``: their mean weighted by ``softmax(gate(x))``."""
    if how == "attention":
        logits = gate(x).squeeze(-1)
        if mask is None:
            return (torch.softmax(logits, dim=1).unsqueeze(-1) * x).sum(1)
        # a finite floor, not -inf: an empty set's row stays finite (uniform), then zeroed
        att = torch.softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=1) * mask.to(x.dtype)
        return (att.unsqueeze(-1) * x).sum(1)
    pooled = x.sum(1)
    if how == "mean":
        pooled = pooled / (mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype) if mask is not None else x.shape[1])
    return pooled


def _read_in_float32_where_low_precision_fails(read: Callable[[Tensor], Tensor], seq: Tensor,
                                               reader: nn.RNNBase) -> Tensor:
    """``read(seq)``; on the CPU under autocast, where torch's own LSTM cannot run in low precision
    (oneDNN has no bfloat16 LSTM on x86 CPUs without AVX-512: "could not create a primitive
    descriptor for the LSTM forward propagation primitive"), the read once more with autocast off,
    in the reader's float32 (or float64), and a warning that names the reason: the set vector an
    LSTM in that precision reads, where the call would otherwise fail. Where that fails too, the
    first error is raised."""
    if seq.device.type != "cpu" or not autocast_enabled("cpu"):
        return read(seq)
    try:
        return read(seq)
    except RuntimeError as err:
        dtype = reader.weight_ih_l0.dtype
        if dtype not in (torch.float32, torch.float64):
            raise
        try:
            with autocast_off("cpu"):
                h = read(seq.to(dtype))
        except Exception:
            raise err
        warnings.warn(f"setperm: torch's {type(reader).__name__} cannot run under CPU autocast here "
                      f"({build_error_cause(err)}); the encoder reads the sequence in "
                      f"{str(dtype).replace('torch.', '')} instead", RuntimeWarning, stacklevel=user_stacklevel())
        return h


def _final_state(outputs) -> Tensor:
    """The last layer's final state from ``nn.LSTM``'s ``(out, (h_n, c_n))`` (c_n) or ``nn.GRU``'s
    ``(out, h_n)`` (h_n)."""
    state = outputs[1]
    return (state[1] if isinstance(state, tuple) else state)[-1]


class PermutationSetEncoder(nn.Module):
    """Permutation-invariant set encoder: PO permutes the set, an LSTM reads the sequence, and
    the LSTM's last cell state is the set representation (paper section 4.4, appendix F.4);
    ``straight_through``, ``rnn`` and ``pool`` are options beyond the paper (which one suits which
    kind of task is measured in the README, "Which setting for which task").

    Args:
        in_features: element dimension D.
        hidden_size: units of the recurrent reader (the output size).
        po: the permutation module, ready built with the settings wanted (as PyG's
            ``DeepSetsAggregation`` takes its modules): a :class:`PermutationOptimization` or a
            :class:`LinAssign` on ``in_features`` (or ``order_features``) features, e.g.
            ``PermutationOptimization(13, cost_hidden=128, steps=3)`` for the paper's VQA setting
            (F.4); ``"po-u"`` (default), a ``PermutationOptimization`` with its defaults; or None:
            no permutation, the paper's "BAN + LSTM" baseline (elements read in input order,
            which is not permutation invariant). The encoder checks its input once itself; a
            ready module checks it again unless built with ``check_finite=False`` (as the one
            built for ``"po-u"`` is).
        straight_through: if True (default False, the paper's configuration), the LSTM reads the
            set in the hard order of the Hungarian algorithm applied to ``P`` (every position holds
            exactly one element) while gradients flow through the soft ``P``: it reads
            ``apply_permutation(x, P_hard + P - P.detach())``, the straight-through estimator. A
            soft ``P`` mixes several elements into each position of the sequence; the hard order
            keeps element identity, which counts and histograms over the set need. Not with
            ``po=None``. The Hungarian step runs on the CPU (O(n^3) per set).
        rnn: the recurrent reader, ``"lstm"`` (default, the paper's: the set vector is its last cell
            state) or ``"gru"`` (not in the paper: its last hidden state). A GRU's state is a
            gated convex update, so reading an element twice leaves it nearly where once did:
            it marks which values are present, where the LSTM's additive cell counts them;
            measured in ``integrations/set_tasks``, the GRU answers distinct-value counts.
        pool: None (default, the paper's readout: the reader's last state alone), ``"sum"``,
            ``"mean"`` or ``"attention"``: the set vector is ``state + W [pool of the elements]``,
            a bias-free linear map of the sum, the mean, or the softmax-weighted mean (weights
            ``softmax_i(a . x_i)`` over the real elements, ``a`` learned, as attentional
            aggregation) of the (relevance-weighted) elements. Not in the paper: a recurrent
            state expresses a sum or a selection of one element only through its gates, which
            pooling gives directly; ``"mean"`` and ``"attention"`` keep the pooled term's scale
            independent of the set size. An empty set still gives ``h = 0``. Unlike the permutation
            and the reader, the pooled term is not computed on scaled sets: elements near the
            dtype's maximum overflow it.
        order_features: if given (default None: the ordering cost sees ``x``), the permutation is
            optimised on separate per-element features ``order_by`` (B, N, order_features) passed
            to ``forward``, while the LSTM still reads ``x``: a sort key next to the payload, e.g.
            box coordinates for a spatial order. Not with ``po=None`` (no permutation to optimise).
        check_finite: as in :class:`PermutationOptimization`, for ``x``, ``weights`` and ``order_by``.
        read: how the reader reads the padded batch, :func:`last_state`'s ``method``: ``"auto"``
            (default: on the CPU the read the cost model expects to be fastest, on CUDA packed
            with ``lengths`` on the host, else padded), ``"packed"``, ``"grouped"``, ``"padded"``
            or ``"fused"`` (an LSTM of up to 128 units on CUDA: two Triton kernels,
            :mod:`setperm.fused_read`; elsewhere as ``"auto"``). All compute the same set vector.
            Under the CPU's autocast, on CPUs where torch's LSTM has no low-precision kernel (oneDNN
            on x86 without AVX-512), the read runs in the reader's float32 instead, warned.
        device, dtype: where and in which dtype to create the LSTM (and the module for ``"po-u"``);
            a ready ``po`` stays where it was built.

    All arguments after ``po`` are keyword-only.

    Submodules: ``po`` (the permutation module, None for ``po=None``), ``lstm`` (or ``gru`` with
    ``rnn="gru"``; the other is None), ``pool_linear``
    (``Linear(in_features, hidden_size, bias=False)`` with ``pool``, else None), ``pool_gate``
    (``Linear(in_features, 1, bias=False)``, the attention logits, with ``pool="attention"``).

    Shapes:
        ``forward(x (B, N, D), mask (B, N) | None, lengths (B,) | None, weights (B, N) | None,
        return_permutation=False, *, key_padding_mask (B, N) | None, order_by (B, N, E) | None)
        -> h (B, hidden_size)``;
        with ``return_permutation=True`` -> ``(h, P (B, N, N))``. ``mask`` is True at real
        elements, ``key_padding_mask`` True at padding, ``lengths`` gives prefix padding (at most
        one of them). ``weights`` are relevance logits: each element is scaled by
        ``sigmoid(weights)`` before the LSTM (F.4); the ordering cost sees the unscaled elements
        (or ``order_by``, required exactly when ``order_features`` was given). ``P`` is always the
        soft permutation, also with ``straight_through``.
        Padding has no influence: the LSTM's state is read after the n real elements
        (:func:`last_state`). On the CPU the reader is called the way :func:`read_costs` expects to
        be fastest for the batch's sizes: once per distinct size of a non-empty set, on that size's
        sets without their padding (a forward hook on ``lstm`` fires as often, each time with those
        rows), or once on the whole batch (packed, or padded, which uses the LSTM's weights
        without calling it, so the CPU's choice leaves it out for an LSTM with hooks); elsewhere
        once per forward, except the padded read of an LSTM (with ``mask=``, where a hook on it
        is named in a warning instead of run). On CUDA, ``lengths``
        given as a CPU tensor serve a packed sequence as
        they are; with a ``mask`` the LSTM reads the whole padded batch, padding zeroed, its padded
        steps made to hold the cell state (:func:`last_state`), so neither makes a host
        synchronisation. ``lengths`` on the device are read the padded way too, but their range
        check (0 <= lengths <= N, the ValueError of a bad length) reads them on the host: one
        synchronisation per call (a ``mask``, or the lengths as a CPU tensor, make none);
        an empty set gives ``h = 0``, N = 0 gives ``h = zeros(B, hidden_size)`` and ``P`` of shape
        ``(B, 0, 0)``, B = 0 gives ``h = zeros(0, hidden_size)``; backward works in every case.
    """

    def __init__(self, in_features: int, hidden_size: int, po: Union[PermutationOptimization, str, None] = "po-u",
                 *, straight_through: bool = False, rnn: str = "lstm", pool: Optional[str] = None,
                 order_features: Optional[int] = None, check_finite: Optional[bool] = None, read: str = "auto",
                 device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        in_features = check_int(in_features, "in_features", 1)
        if not isinstance(rnn, str) or rnn not in RNNS:
            raise ValueError(f"rnn must be one of {RNNS}, got {rnn!r}")
        if pool is not None and (not isinstance(pool, str) or pool not in POOLS):
            raise ValueError(f"pool must be None or one of {POOLS}, got {pool!r}")
        hidden_size = check_int(hidden_size, "hidden_size", 1)
        if not isinstance(read, str) or read not in READS:
            raise ValueError(f"read must be one of {READS}, got {read!r}")
        if read == "fused" and rnn != "lstm":
            raise ValueError(f"read='fused' reads an LSTM, got rnn={rnn!r}")
        if not (po is None or isinstance(po, PermutationOptimization) or (isinstance(po, str) and po == "po-u")):
            raise ValueError(f"po must be a PermutationOptimization or LinAssign module, 'po-u' or None, got {po!r}")
        if order_features is not None:
            order_features = check_int(order_features, "order_features", 1)
            if po is None:
                raise ValueError("order_features needs a permutation to optimise, got po=None")
        if not isinstance(straight_through, bool):
            raise ValueError(f"straight_through must be a bool, got {straight_through!r}")
        if straight_through and po is None:
            raise ValueError("straight_through=True needs a permutation to harden, got po=None")
        key_features = in_features if order_features is None else order_features
        if isinstance(po, PermutationOptimization) and po.in_features != key_features:
            raise ValueError(f"po orders {po.in_features} features but the encoder gives it {key_features} "
                             f"({'order_features' if order_features is not None else 'in_features'}); "
                             f"build it as {type(po).__name__}({key_features}, ...)")
        self.order_features = order_features
        self.straight_through = straight_through
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.check_finite = check_check_finite(check_finite)
        if isinstance(po, str):
            # check_finite=False: this encoder checks x (and the weights) once itself.
            po = PermutationOptimization(key_features, check_finite=False, **factory_kwargs)
        self.po: Optional[PermutationOptimization] = po
        self.rnn = rnn
        self.read = read
        reader = uninitialized(nn.LSTM if rnn == "lstm" else nn.GRU, in_features, hidden_size, batch_first=True,
                               **factory_kwargs)
        self.lstm: Optional[nn.LSTM] = reader if rnn == "lstm" else None
        self.gru: Optional[nn.GRU] = reader if rnn == "gru" else None
        self.pool = pool
        # bias-free, so that an empty set (pool 0) still gives h = 0
        self.pool_linear = (uninitialized(nn.Linear, in_features, hidden_size, bias=False, **factory_kwargs)
                            if pool is not None else None)
        self.pool_gate = (uninitialized(nn.Linear, in_features, 1, bias=False, **factory_kwargs)
                          if pool == "attention" else None)
        self._reset_readout()       # the permutation module initialised itself

    def reset_parameters(self) -> None:
        """The permutation module's init (Xavier, eta = ``eta_init``), then Xavier per LSTM gate
        with zero biases (appendix F), then the pooling map (Xavier); the same random draws as
        construction (the module first)."""
        if self.po is not None:
            self.po.reset_parameters()
        self._reset_readout()

    def _reset_readout(self) -> None:
        xavier_rnn_(self.reader)
        for layer in (self.pool_linear, self.pool_gate):
            if layer is not None:
                xavier_linear_(layer)

    @property
    def reader(self) -> nn.RNNBase:
        """The recurrent reader: ``lstm`` or ``gru``."""
        return self.lstm if self.lstm is not None else self.gru

    @property
    def eta(self) -> Optional[Tensor]:
        """The permutation module's step size (None for ``po=None``, LinAssign or ``steps=0``)."""
        return None if self.po is None else self.po.eta

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, return_permutation: bool = False, *,
                key_padding_mask: Optional[Tensor] = None, order_by: Optional[Tensor] = None):
        check_set(x, features=self.in_features)
        check_module_device(x, self.reader)
        dtype = self.reader.weight_ih_l0.dtype
        check_dtype(x, dtype)
        mask = resolve_mask(x, mask, lengths, key_padding_mask)
        if self.order_features is None and order_by is not None:
            raise ValueError("order_by: this encoder orders x itself (order_features=None); construct it with "
                             f"order_features={order_by.shape[-1] if isinstance(order_by, Tensor) else '...'} "
                             "to order by separate features")
        if self.order_features is not None:
            if order_by is None:
                raise ValueError(f"order_by: required, (B, N, {self.order_features}), since the encoder was "
                                 f"built with order_features={self.order_features}")
            check_set(order_by, "order_by", features=self.order_features)
            if tuple(order_by.shape[:2]) != tuple(x.shape[:2]):
                raise ValueError(f"order_by must have shape (B, N, {self.order_features}) with (B, N) = "
                                 f"{tuple(x.shape[:2])} of x, got shape {tuple(order_by.shape)}")
            check_dtype(order_by, dtype, name="order_by")
            check_same_device(order_by, "order_by", x, "x")
        check_weights(x, weights)
        if weights is not None:
            check_dtype(weights, dtype, name="weights")
        if resolve_check_finite(self.check_finite, x):
            _check_finite(x, mask)
            if weights is not None:
                _check_finite(weights.unsqueeze(-1), mask, name="weights")
            if order_by is not None:
                _check_finite(order_by, mask, name="order_by")
        B, N, D = x.shape
        if N == 0:
            # The LSTM cannot read a length-0 sequence: encode one padded slot instead, which gives
            # the empty set's h = 0 through the LSTM (so backward reaches its parameters).
            empty_key = None if order_by is None else order_by.new_zeros(B, 1, order_by.shape[-1])
            h, _ = self._encode(x.new_zeros(B, 1, D), torch.zeros(B, 1, dtype=torch.bool, device=x.device), None,
                                False, empty_key)
            return (h, x.new_zeros(B, 0, 0)) if return_permutation else h
        # Lengths given on the host serve the LSTM's packed sequence as they are (no device -> host copy).
        host_lengths = None
        if lengths is not None and (not isinstance(lengths, Tensor) or lengths.device.type == "cpu"):
            host_lengths = torch.as_tensor(lengths).to(torch.int64)
        h, P = self._encode(x, mask, weights, return_permutation, order_by, host_lengths)
        return (h, P) if return_permutation else h

    def _encode(self, x: Tensor, mask: Optional[Tensor], weights: Optional[Tensor],
                return_permutation: bool, order_by: Optional[Tensor] = None,
                host_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``x`` (B, N >= 1, D) checked -> h (B, hidden_size), P (B, N, N) (None for po=None unless
        ``return_permutation``)."""
        B, N, _ = x.shape
        x = zero_padding(x, mask)
        P: Optional[Tensor] = None
        order: Optional[Tensor] = None
        if self.po is not None:
            key = x if order_by is None else zero_padding(order_by, mask)
            P = self.po(key, mask=mask)   # through __call__: the module's hooks fire
        elif mask is not None:
            # "LSTM only": keep the input order of the real elements, padding moved to the end
            # (a gather, not a matmul with the equivalent permutation matrix).
            order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        if weights is not None:
            x = x * torch.sigmoid(zero_padding(weights.unsqueeze(-1), mask))
        if P is not None and self.straight_through:
            # Straight-through: the forward value is the hard permutation exactly (P - P.detach() is 0),
            # the gradient is that of the soft P. hungarian() solves only the real block and puts padded
            # elements on the trailing positions, which the packed LSTM below never reads.
            _, P_hard = hungarian(P, mask=mask, return_matrix=True)
            seq = apply_permutation(x, P_hard + (P - P.detach()))
        elif P is not None:
            seq = apply_permutation(x, P)
        elif order is not None:
            seq = x.gather(1, order.unsqueeze(-1).expand_as(x))
        else:
            seq = x
        lengths = None
        if not (B == 0 or (mask is None and self.read != "fused")):   # (pack_padded_sequence rejects an empty batch)
            lengths = mask.sum(1) if mask is not None else torch.full((B,), N, dtype=torch.int64, device=x.device)

        def read(seq: Tensor) -> Tensor:
            if lengths is None:
                return _final_state(self.reader(seq))
            return last_state(self.reader, seq, lengths, method=self.read, host_lengths=host_lengths)
        h = _read_in_float32_where_low_precision_fails(read, seq, self.reader)
        if self.pool_linear is not None:
            # the pooled set is permutation invariant whatever P is
            h = h + self.pool_linear(_pool_elements(x, mask, self.pool, self.pool_gate))
        if P is None and return_permutation:
            P = (permutation_matrix(order, dtype=x.dtype) if order is not None
                 else torch.eye(N, dtype=x.dtype, device=x.device).expand(B, N, N))
        return h, P

    def extra_repr(self) -> str:
        # the permutation module's settings are in its own repr (the ``po`` submodule)
        pairs = [("in_features", self.in_features), ("hidden_size", self.hidden_size)]
        if self.rnn != "lstm":
            pairs.append(("rnn", self.rnn))
        if self.read != "auto":
            pairs.append(("read", self.read))
        if self.po is None:
            pairs.append(("po", None))
        else:
            pairs.append(("straight_through", self.straight_through))
        if self.pool is not None:
            pairs.append(("pool", self.pool))
        if self.order_features is not None:
            pairs.append(("order_features", self.order_features))
        pairs.append(("check_finite", self.check_finite))
        return _repr(pairs)
