"""Drop-in layers backed by sparseq's kernels."""
from .embedding import QuantizedEmbedding
from .int8_linear import FusedActivation, Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear
from .sparse_linear import (BlockSparseLinear, Sparse24Linear, SparseInt8Linear, SparseLinear,
                            choose_format)

__all__ = ["Int8Linear", "Int8StaticLinear", "Int8WeightOnlyLinear", "SparseLinear", "Sparse24Linear", "BlockSparseLinear",
           "SparseInt8Linear", "QuantizedEmbedding", "FusedActivation", "choose_format"]
