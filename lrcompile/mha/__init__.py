"""nn.MultiheadAttention's packed in_proj and its out_proj as linear sites."""

from .install import install_mha, merge_mha
from .module import Factored, FactoredMHA

__all__ = ["Factored", "FactoredMHA", "install_mha", "merge_mha"]
