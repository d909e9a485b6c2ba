"""Factorisation: truncated SVD, whitening, calibration statistics, the factor cache."""
