"""Diffusion stage: SDAS schedulers, the sampling pipeline, model folders, losses, training."""
