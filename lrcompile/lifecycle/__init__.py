"""A rewritten model's life: save/load, merge, adapter state, healing, param groups, DDP."""
