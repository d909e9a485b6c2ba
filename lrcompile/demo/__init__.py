"""Small bundled models (the demo transformer)."""
