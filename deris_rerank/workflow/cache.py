"""Old import path of the feature-cache format (kept for existing code): now `deris_rerank.venice.cache`."""
from ..venice.cache import SHARD_PATTERN, read_cache, shard_ids, shard_path, shard_provenance, write_shard

__all__ = ["SHARD_PATTERN", "read_cache", "shard_ids", "shard_path", "shard_provenance", "write_shard"]
