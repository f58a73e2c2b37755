"""Hybrid sliding-window softmax + linear attention (LoLCATs eq. 7). The math is in README.md beside this file."""

from .naive import hybrid_attention_naive

__all__ = ["hybrid_attention_naive"]
