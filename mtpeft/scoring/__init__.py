"""One scorer for every task: no task needs its own head, and unseen tasks score zero-shot.

- :class:`EncoderScorer`: cosine similarity between the pooled input (through the bank's modules) and
  the pooled label texts (through the bare backbone, cached), divided by a temperature.
- :class:`CausalScorer`: rank classification by the length-normalised log-likelihood of each label
  text after a prompt; the prompts once, then the labels packed per example, in chunks.

``scorer.logits(bank, texts, tasks, routing)`` scores each example against its own task's labels (a
mixed-task batch in one call). With ``labels=`` a :class:`LabelSpace` (global label ids over several
tasks) and optional per-example ``candidates``, the columns are the space's ids instead.
"""
from .causal import CausalScorer
from .encoder import EncoderScorer
from .labels import LabelSpace


def make_scorer(backbone, **kw):
    """The scorer of the backbone's family (``encoder`` or ``causal``); ``kw`` go to its constructor."""
    if backbone.family == "encoder":
        return EncoderScorer(backbone.tokenizer, **kw)
    return CausalScorer(backbone.tokenizer, **kw)


__all__ = ["CausalScorer", "EncoderScorer", "LabelSpace", "make_scorer"]
