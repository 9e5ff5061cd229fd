"""nn.Modules that replace dense layers with factorized ones: from_dense(), forward, to_dense()."""

from .linear import LowRankLinear

__all__ = ["LowRankLinear"]
