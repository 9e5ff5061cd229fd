"""nn.Modules that replace dense layers with factorized ones: from_dense(), forward, to_dense()."""

from .conv import CPConv2d, SVDConv2d, TuckerConv2d, conv_from_dense
from .embedding import LowRankEmbedding, TiedLowRankHead, TTEmbedding
from .kron import KronLinear
from .linear import LowRankLinear
from .quant import QuantLinear, QuantLowRankLinear
from .registry import LAYERS
from .tt import TTLinear

__all__ = [
    "LAYERS",
    "CPConv2d",
    "KronLinear",
    "LowRankEmbedding",
    "LowRankLinear",
    "QuantLinear",
    "QuantLowRankLinear",
    "SVDConv2d",
    "TTEmbedding",
    "TTLinear",
    "TiedLowRankHead",
    "TuckerConv2d",
    "conv_from_dense",
]
