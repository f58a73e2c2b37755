"""Attention ops of linearize, imported as ``linearize.kernels`` (see pyproject.toml).

Each op lives in its own folder with ``naive.py`` (float32, quadratic, obviously right) beside the fast paths.
Layout everywhere: ``[B, T, H, D]``.
"""
