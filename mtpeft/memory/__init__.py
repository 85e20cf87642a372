"""The replay memory: examples keyed by frozen-backbone embeddings in a searchable, bounded store."""
from .core import ReplayMemory
from .embed import embed_texts
from .example import Example
from .index import DEFAULT_EXACT_LIMIT, IVFConfig
from .policies import POLICIES, REJECT, ClassBalanced, Reservoir, StoragePolicy, TaskBalanced
from .shards import dist_search, gather_examples, merge_insertions, merge_topk, search_shards, shard_index

__all__ = ["DEFAULT_EXACT_LIMIT", "POLICIES", "REJECT", "ClassBalanced", "Example", "IVFConfig", "ReplayMemory",
           "Reservoir", "StoragePolicy", "TaskBalanced", "dist_search", "embed_texts", "gather_examples",
           "merge_insertions", "merge_topk", "search_shards", "shard_index"]
