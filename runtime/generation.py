"""Kept only for runtime/server/choice.py's import of Delta and Timings (runtime.sequence
defines them); the one-sequence reference generator is tests/reference_model.py now."""

from runtime.sequence import Delta, Timings

__all__ = ["Delta", "Timings"]
