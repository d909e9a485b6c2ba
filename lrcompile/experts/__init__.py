"""MoE experts as sites: transformers 5's 3-D expert weights, addressed per expert and rewritten per expert."""

from .bank import EXPERT_FAMILIES, ExpertBank, is_experts
from .install import install_experts

__all__ = ["EXPERT_FAMILIES", "ExpertBank", "install_experts", "is_experts"]
