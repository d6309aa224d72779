"""setperm's set encoder as a PyTorch Geometric aggregation (``torch_geometric.nn.aggr``).

PyG is an optional dependency (``pip install setperm[pyg]``): ``import setperm`` never imports this
module; ``from setperm.pyg import PermutationAggregation`` does, and only then is PyG needed.

PyG passes a set as its *sparse* batch form: the elements of all sets stacked in ``x (E, F)`` and
``index (E,)`` naming the set of every element (sorted, as for PyG's ``LSTMAggregation``). The
aggregation densifies that with the base class's ``to_dense_batch`` (mask True = real element) and
runs :class:`setperm.PermutationSetEncoder`: PO permutes each set (paper section 2, algorithm 1)
and an LSTM reads the permuted sequence, its last cell state is the set representation (section
4.4, appendix F.4). Padded elements have no influence on the encoder, so the output of a set does
not depend on which other sets share its batch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

try:
    from torch_geometric.experimental import disable_dynamic_shapes
    from torch_geometric.nn.aggr import Aggregation
except ImportError as e:          # the optional extra is missing: say how to get it
    raise ImportError(f"setperm.pyg needs PyTorch Geometric ({e}); install it with "
                      f"`pip install \"setperm[pyg]\"` or `pip install torch_geometric`") from e

from ._errors import check_int
from .encoder import PermutationOptimization, PermutationSetEncoder
from .masking import first_non_finite, resolve_check_finite


def _index_from_ptr(ptr: Tensor, rows: int) -> Tensor:
    """The set of every row from CSR boundaries ``ptr (S + 1,)``: integers from 0 to ``rows``, non-decreasing
    (PyG's ``segment`` reads rows ``ptr[s]:ptr[s + 1]`` as set ``s``). One host read checks them all; the
    expansion after it, given its size, needs none."""
    if not isinstance(ptr, Tensor) or ptr.dim() != 1 or ptr.numel() == 0 or ptr.is_floating_point() \
            or ptr.is_complex() or ptr.dtype == torch.bool:
        got = f"{ptr.dtype} of shape {tuple(ptr.shape)}" if isinstance(ptr, Tensor) else type(ptr).__name__
        raise ValueError(f"ptr must be a 1-D integer tensor of S + 1 CSR boundaries, got {got}")
    sizes = ptr.diff()
    if not bool((ptr[0] == 0) & (ptr[-1] == rows) & (sizes >= 0).all()):
        bounds = ptr.tolist()
        if bounds[0] != 0:
            raise ValueError(f"ptr must start at 0, the first row of x, got ptr[0] = {bounds[0]}")
        drop = next((i for i in range(len(bounds) - 1) if bounds[i + 1] < bounds[i]), None)
        if drop is not None:
            raise ValueError(f"ptr must be non-decreasing, got ptr[{drop}] = {bounds[drop]} > "
                             f"ptr[{drop + 1}] = {bounds[drop + 1]}")
        raise ValueError(f"ptr must mark the boundaries of the {rows} rows of x, got boundaries spanning "
                         f"{bounds[-1]} rows (ptr of shape {tuple(ptr.shape)})")
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=ptr.device), sizes, output_size=rows)


def _check_finite_rows(values: Tensor, mask: Tensor, index: Tensor, name: str) -> None:
    """Raise if a real element of the dense batch ``values (S, N, ...)`` holds NaN/Inf, naming its row of the
    sparse input (set ``s`` holds rows ``index == s`` in order; the dense slot ``n`` is its n-th row)."""
    bad = first_non_finite(values, mask)
    if bad is not None:
        s, n = bad[:2]
        row = int((index < s).sum()) + n
        raise ValueError(f"{name} has a non-finite value in row {row} (set {s}); remove or replace it, or build "
                         f"the aggregation with check_finite=False to skip this check")


class PermutationAggregation(Aggregation):
    r"""Permutation-optimising set encoder (PO + LSTM) as a PyG aggregation.

    Args:
        in_channels: size F of each element (``in_features`` of the encoder).
        out_channels: size of the set representation (the encoder's LSTM ``hidden_size``).
        po: the permutation module, ready built (as ``DeepSetsAggregation`` takes its MLPs): a
            :class:`setperm.PermutationOptimization` or :class:`setperm.LinAssign` on
            ``in_channels`` features, ``"po-u"`` (default: a ``PermutationOptimization`` with its
            defaults) or None (the LSTM-only ablation, which reads the given order); as in
            :class:`setperm.PermutationSetEncoder`.
        straight_through: the LSTM reads the Hungarian order of P, gradients through the soft P
            (keyword-only, default False).
        rnn: the recurrent reader, ``"lstm"`` (default) or ``"gru"``, as in
            :class:`setperm.PermutationSetEncoder` (keyword-only).
        pool: None (default), ``"sum"``, ``"mean"`` or ``"attention"``: add a linear map of the pooled
            elements to the reader's state, as in :class:`setperm.PermutationSetEncoder` (keyword-only).
        check_finite, device, dtype: as in :class:`setperm.PermutationSetEncoder` (keyword-only).

    Call: ``aggr(x, index=None, ptr=None, dim_size=None, dim=-2, max_num_elements=None,
    weights=None)`` like every PyG aggregation.

    Shapes:
        - input ``x (E, F)``; ``index (E,)`` long and sorted (set of each element) or ``ptr (S + 1,)``
          (CSR boundaries); ``dim_size`` = number of sets S (default: ``index.max() + 1``);
          optional ``weights (E,)`` or ``(E, 1)``: relevance logits, each element is scaled by
          ``sigmoid(weights)`` before the LSTM (paper F.4).
        - output ``(S, out_channels)``. A set without elements (an isolated node, a graph without
          nodes, an index value that never occurs below ``dim_size``) gives **zeros**.

    Permutation invariant: the output of a set does not depend on the order of its elements
    (up to floating-point rounding, and except for ``po=None``, the LSTM-only ablation that
    reads the given order) nor on the other sets in the batch. Inside a ``MessagePassing`` layer
    the incoming edges must be sorted by destination (``index`` sorted), e.g. with
    ``data.sort(sort_by_row=False)``, as for PyG's own ``LSTMAggregation``.
    """

    def __init__(self, in_channels: int, out_channels: int,
                 po: Union[PermutationOptimization, str, None] = "po-u", *, straight_through: bool = False,
                 rnn: str = "lstm", pool: Optional[str] = None, check_finite: Optional[bool] = None, device=None, dtype=None):
        super().__init__()
        in_channels, out_channels = check_int(in_channels, "in_channels", 1), check_int(out_channels, "out_channels", 1)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.encoder = PermutationSetEncoder(in_channels, out_channels, po, straight_through=straight_through,
                                             rnn=rnn, pool=pool, check_finite=check_finite, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter in place, as a new encoder would be (an optimiser that
        holds the parameters keeps working); the encoder's own reset."""
        self.encoder.reset_parameters()

    @property
    def eta(self) -> Optional[Tensor]:
        """The learned inner step size of PO (None for ``po=None``, LinAssign or ``steps=0``)."""
        return self.encoder.eta

    @disable_dynamic_shapes(required_args=["dim_size", "max_num_elements"])
    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2, max_num_elements: Optional[int] = None,
                weights: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape (E, {self.in_channels}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        # PO-LA has one position vector per slot of the dense batch (paper eq. 6, right); None otherwise
        positions = getattr(self.encoder.po, "num_positions", None)
        if max_num_elements is not None:
            # 0 would drop every element (all sets zeros); PyG reads a bool or a negative size without a word
            max_num_elements = check_int(max_num_elements, "max_num_elements", 1)
            if positions is not None and max_num_elements > positions:
                raise ValueError(f"max_num_elements={max_num_elements} pads every set to {max_num_elements} elements, "
                                 f"more than the {positions} positions of PO-LA (num_positions); pass at most "
                                 f"{positions}, or build the PO with num_positions >= {max_num_elements}")
        if index is None and ptr is not None:
            # to_dense_batch works on index only: expand the CSR boundaries (sets are contiguous).
            index = _index_from_ptr(ptr, x.shape[0])
        elif isinstance(index, Tensor) and (index.dim() != 1 or index.shape[0] != x.shape[0]):
            # PyG's densification would fail in an expand, naming no argument
            raise ValueError(f"index must have shape ({x.shape[0]},), the set of every row of x, got "
                             f"{tuple(index.shape)}")
        if weights is not None:
            if not isinstance(weights, Tensor) or weights.reshape(-1).shape[0] != x.shape[0] or \
                    weights.dim() > 2 or (weights.dim() == 2 and weights.shape[1] != 1):
                raise ValueError(f"weights must have shape ({x.shape[0]},) or ({x.shape[0]}, 1), got "
                                 f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}")
            # densified with the elements, as one more column: one scatter, the same padding and the
            # same elements dropped past max_num_elements
            x = torch.cat([x, weights.reshape(-1, 1).to(x.dtype)], dim=-1)
        if dim_size == 0 and x.shape[0] == 0:
            # No set at all (a graph without nodes inside a MessagePassing layer, an empty batch): PyG's
            # to_dense_batch cannot size an empty batch (max of an empty tensor), the output has no rows.
            self.assert_two_dimensional_input(x, dim)
            return x.new_zeros(0, self.out_channels)
        dense, mask = self.to_dense_batch(x, index, ptr, dim_size, dim, max_num_elements=max_num_elements)
        num_sets = dense.shape[0]
        dense_weights = None
        if weights is not None:
            dense, dense_weights = dense[..., :-1], dense[..., -1]
        if dense.shape[1] == 0:
            # No set holds an element: the documented output of an empty set.
            return dense.new_zeros(num_sets, self.out_channels)
        if positions is not None and dense.shape[1] > positions:
            # named here in the sparse form's terms (the encoder would name the dense batch, which the caller never saw)
            raise ValueError(f"the largest set has {dense.shape[1]} elements, more than the {positions} positions of "
                             f"{type(self.encoder.po).__name__} (num_positions); pass max_num_elements={positions} "
                             f"to keep the first {positions} elements of every set (as PyG's aggregations do), or "
                             f"build the PO with num_positions >= {dense.shape[1]}")
        try:
            return self.encoder(dense, mask=mask, weights=dense_weights)
        except ValueError:
            # The encoder checks its input first and names an index of the dense batch, which the caller
            # never made: the same check again, only after a failure (one check per call otherwise),
            # names the row of x instead.
            if resolve_check_finite(self.encoder.check_finite, dense):
                for values, name in ((dense, "x"), (dense_weights, "weights")):
                    if values is not None:
                        try:
                            _check_finite_rows(values, mask, index, name)
                        except ValueError as named:
                            raise named from None
            raise

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, {self.extra_repr()})"

    def extra_repr(self) -> str:
        # one line, as PyG's aggregations: the permutation module's settings, then the encoder's own
        po = self.encoder.po
        options = "" if self.encoder.rnn == "lstm" else f", rnn={self.encoder.rnn!r}"
        options += "" if self.encoder.pool is None else f", pool={self.encoder.pool!r}"
        if po is None:
            return "po=None" + options
        return f"po={type(po).__name__}({po.extra_repr()}), straight_through={self.encoder.straight_through}" + options
