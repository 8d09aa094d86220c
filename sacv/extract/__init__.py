"""The extraction stage: collections and the image catalog, its plan, decoding pools, shard extraction,
per-image position statistics, compaction of the store."""
