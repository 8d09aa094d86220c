"""The scoring stage: maps over the dataset, per-image scores, the tables; localisation against masks."""
