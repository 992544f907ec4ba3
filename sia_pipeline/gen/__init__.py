"""Generation stage: the plan (spec -> shard tasks), Ray runner, sampler worker, ``generate``."""
