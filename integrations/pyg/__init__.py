"""setperm as a PyTorch Geometric aggregation (optional: needs ``torch_geometric``).

``PermutationAggregation(in_channels, out_channels, **encoder_kwargs)`` is a
``torch_geometric.nn.aggr.Aggregation``: a graph readout or the ``aggr=`` of a ``MessagePassing``
layer. The core library ``setperm`` never imports PyG; only this package does.
"""
from .aggregation import PermutationAggregation

__all__ = ["PermutationAggregation"]
