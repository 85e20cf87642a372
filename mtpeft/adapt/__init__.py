"""Few-shot transfer from a bank of experts to a new task (``mtpeft adapt``): methods (``methods/``, one file
each), shot sampling, Fisher task embeddings and the loop that compares them."""
from .fisher import fisher_embedding, probe_fisher, similarity_matrix, store_fisher, stored_fisher
from .methods import (
           ADAPT_METHODS,
           AdaptContext,
           AdaptMethod,
           AdaptResult,
           Budget,
           SkillsMethod,
           get_method,
           method_names,
           register_method,
)
from .run import run_adapt, source_experts
from .shots import check_shots, sample_shots

__all__ = ["ADAPT_METHODS", "AdaptContext", "AdaptMethod", "AdaptResult", "Budget", "SkillsMethod", "check_shots",
           "fisher_embedding", "get_method", "method_names", "probe_fisher", "register_method", "run_adapt",
           "sample_shots", "similarity_matrix", "source_experts", "store_fisher", "stored_fisher"]
