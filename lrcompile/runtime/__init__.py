"""Runtime: where factors live on the model, and keeping them fresh while it runs."""
