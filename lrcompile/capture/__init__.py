"""Capture: Dynamo's FX graph -> sites (linear and attention), named by module path."""
