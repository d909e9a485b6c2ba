"""Adapter families (LoRA, DoRA, VeRA, NOBLE): a branch added to a kept base weight."""
