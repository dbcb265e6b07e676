"""Structural pruning: remove or skip transformer blocks (depth) and score them first."""
