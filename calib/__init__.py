"""Calibration data, observers on the layer stream, routing statistics and accuracy checks."""
