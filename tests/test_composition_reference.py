"""The composition module against the RealNet authors' code on the same inputs.

Perlin noise: same RNG state -> the same array; the whole mask (their noise, imgaug's rotation
recipe, threshold) is the same for the same scales, angle and RNG state. Foreground: the
authors' per-dataset rule (their ``generate_target_foreground_mask`` with scikit-image
morphology) -> the same mask as this project's table, for every category of MVTec AD, VisA,
MPDD and BTAD, on real images.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from _reference import reference_functions
from PIL import Image

from sia_pipeline.compose import CATEGORY_RULES, foreground_mask, perlin_noise

# The authors call skimage.morphology.square, deprecated in scikit-image 0.25.
pytestmark = pytest.mark.filterwarnings("ignore:`square` is deprecated:FutureWarning")

DATASETS = {
    "mvtec": (
        "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile "
        "toothbrush transistor wood zipper"
    ).split(),
    "visa": (
        "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum"
    ).split(),
    "mpdd": "bracket_black bracket_brown bracket_white connector metal_plate tubes".split(),
    "btad": ["01", "02", "03"],
}


@pytest.mark.parametrize(
    ("shape", "res", "seed"),
    [
        ((256, 256), (1, 1), 0),
        ((256, 256), (4, 32), 1),
        ((128, 64), (8, 2), 2),
        ((64, 64), (16, 16), 3),
    ],
)
def test_perlin_noise_equals_the_authors(shape, res, seed):
    ref = reference_functions("lerp_np", "rand_perlin_2d_np")["rand_perlin_2d_np"]
    np.random.seed(seed)
    theirs = ref(shape, res)
    ours = perlin_noise(shape, res, np.random.RandomState(seed))
    assert ours.shape == shape
    np.testing.assert_array_equal(ours, theirs)


def _authors_foreground():
    morphology = pytest.importorskip("skimage.morphology", reason="scikit-image (test extra)")
    fn = reference_functions("generate_target_foreground_mask", cv2=cv2, morphology=morphology)[
        "generate_target_foreground_mask"
    ]
    return lambda img, dataset, cat: np.asarray(fn(None, img, dataset, cat)).astype(bool)


def _real_images(shared_data) -> list[np.ndarray]:
    paths = [
        shared_data / "mvtec_ad/bottle/train/good/000.png",
        next(iter(sorted((shared_data / "magnetic_tile/magnetic_tile/train/good").iterdir()))),
        next(iter(sorted((shared_data / "dtd/images/banded").iterdir()))),
        next(iter(sorted((shared_data / "dtd/images/bubbly").iterdir()))),
    ]
    return [np.asarray(Image.open(p).convert("RGB").resize((256, 256))) for p in paths]


def test_table_covers_every_category_of_the_four_datasets():
    every = {c for cats in DATASETS.values() for c in cats}
    assert set(CATEGORY_RULES) == every


@pytest.mark.parametrize(
    ("dataset", "category"), [(d, c) for d, cats in DATASETS.items() for c in cats]
)
def test_foreground_rule_equals_the_authors(dataset, category, shared_data):
    theirs = _authors_foreground()
    rule = CATEGORY_RULES[category]
    for img in _real_images(shared_data):
        expected = theirs(img, dataset, category)
        got = foreground_mask(img, rule)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected, err_msg=f"{category}: {rule.describe()}")


def test_the_reference_is_the_authors_code():
    # Guard: the function run is the authors' (it rejects a data set it does not know).
    theirs = _authors_foreground()
    with pytest.raises(NotImplementedError):
        theirs(np.zeros((8, 8, 3), np.uint8), "kolektor", "x")


def _imgaug_rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """imgaug 0.4's ``Affine(rotate=...)`` on a float image, from its source: the matrix of
    ``_AffineSamplingResult.to_matrix`` (skimage transforms, centre ``size / 2 - 0.5``, the
    shear-y pair around a zero shear) and ``_warp_affine_arr_cv2`` (order 1, constant 0)."""
    tf = pytest.importorskip("skimage.transform", reason="scikit-image (test extra)")
    h, w = image.shape[:2]
    shift_y, shift_x = h / 2.0 - 0.5, w / 2.0 - 0.5
    matrix = (
        tf.SimilarityTransform(translation=[-shift_x, -shift_y])
        + tf.AffineTransform(rotation=-3.141592 / 2)
        + tf.AffineTransform(shear=0.0)
        + tf.AffineTransform(rotation=3.141592 / 2)
        + tf.AffineTransform(scale=(1.0, 1.0), translation=(0, 0), rotation=np.deg2rad(degrees))
        + tf.SimilarityTransform(translation=[shift_x, shift_y])
    )
    return cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix.params[:2],
        dsize=(w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


class _Replay:
    """An RNG that gives perlin_mask fixed scales and angle, and a RandomState's uniforms."""

    def __init__(self, exponents: tuple[int, int], degrees: float, seed: int) -> None:
        self.exponents = list(exponents)
        self.degrees = degrees
        self.state = np.random.RandomState(seed)

    def integers(self, lo: int, hi: int) -> int:
        return self.exponents.pop(0)

    def random(self, size):
        return self.state.random(size)

    def uniform(self, lo: float, hi: float) -> float:
        return self.degrees


@pytest.mark.parametrize(
    ("exponents", "degrees", "seed"), [((0, 0), 0.0, 0), ((2, 5), 37.5, 1), ((4, 1), -81.2, 2)]
)
def test_perlin_mask_equals_the_authors_pipeline(exponents, degrees, seed):
    """Same scales, angle and RNG state: their noise, imgaug's rotation, > 0.5 -> our mask."""
    from sia_pipeline.compose.perlin import perlin_mask, rotate

    ref = reference_functions("lerp_np", "rand_perlin_2d_np")["rand_perlin_2d_np"]
    np.random.seed(seed)
    noise = ref((256, 256), (2 ** exponents[0], 2 ** exponents[1]))
    theirs = _imgaug_rotate(noise, degrees) > 0.5
    ours = perlin_mask((256, 256), _Replay(exponents, degrees, seed))  # type: ignore[arg-type]
    np.testing.assert_array_equal(rotate(noise, degrees), _imgaug_rotate(noise, degrees))
    np.testing.assert_array_equal(ours, theirs)
    assert ours.any() or exponents == (0, 0)
