"""Policy: YAML or dict -> validated rules, matching, and the global budget's allocation."""
