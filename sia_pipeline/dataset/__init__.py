"""Dataset stage: format v1, storage, shard writing, manifest, cards, verify, publish, inspect."""
