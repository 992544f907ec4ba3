"""Format floor: format v1, the generation spec, ``spec.json``, shard writer, manifest, card."""
