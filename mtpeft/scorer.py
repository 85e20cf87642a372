"""Compatibility: the scorers live in :mod:`mtpeft.scoring` (``from mtpeft.scorer import make_scorer``
keeps working)."""
from .scoring import CausalScorer, EncoderScorer, LabelSpace, make_scorer

__all__ = ["CausalScorer", "EncoderScorer", "LabelSpace", "make_scorer"]
