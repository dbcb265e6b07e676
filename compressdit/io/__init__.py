"""Checkpoint I/O and the diffusers quantizer backend."""
