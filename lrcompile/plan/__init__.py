"""Plan: decide per site (pure) -> build factors (error, max_error) -> install; report rows."""
