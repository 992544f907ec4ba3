"""Anomaly composition shared by ``realnet-train`` and ``sia-export`` (numpy + OpenCV only).

``perlin`` draws blob masks, ``foreground`` says where the object is (the authors' table per
category, or a chosen rule), ``texture`` prepares DTD sources, ``blend`` composes, ``resize``
fits non-square images to squares (squash, or letterbox keeping the aspect ratio).
"""

from sia_pipeline.compose.blend import OPACITY_RANGE, Composite, compose, compose_anomaly
from sia_pipeline.compose.foreground import (
    CATEGORY_RULES,
    CHOICES,
    ForegroundRule,
    choose_rule,
    foreground_mask,
)
from sia_pipeline.compose.perlin import perlin_mask, perlin_noise
from sia_pipeline.compose.resize import content_box, content_mask, letterbox
from sia_pipeline.compose.texture import rand_augment, texture_source

__all__ = [
    "CATEGORY_RULES",
    "CHOICES",
    "OPACITY_RANGE",
    "Composite",
    "ForegroundRule",
    "choose_rule",
    "compose",
    "compose_anomaly",
    "content_box",
    "content_mask",
    "foreground_mask",
    "letterbox",
    "perlin_mask",
    "perlin_noise",
    "rand_augment",
    "texture_source",
]
