"""Attention sites: their projections, shared factors, and the attention rewrites."""
