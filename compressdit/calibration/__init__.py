"""Calibration: run the real sampling loop and capture activation statistics through hooks."""
