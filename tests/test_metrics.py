"""PSNR and SSIM against hand-computed values and known properties."""

import math

import numpy as np
import pytest

from evaluation.metrics import psnr, ssim


def test_psnr_matches_the_definition():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 0.1)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.01))
    assert psnr(a, a) == float("inf")


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    very_noisy = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    assert 1.0 > ssim(a, noisy) > ssim(a, very_noisy)


def test_ssim_of_a_constant_shift_depends_only_on_luminance_term():
    a = np.full((16, 16, 1), 0.5)
    b = np.full((16, 16, 1), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)  # variances and covariance are 0
    assert ssim(a, b) == pytest.approx(expected)


def test_uint8_images_are_scaled_to_unit_range_and_shapes_must_match():
    a = np.full((8, 8, 3), 255, dtype=np.uint8)
    assert psnr(a, np.ones((8, 8, 3))) == float("inf")
    with pytest.raises(ValueError, match="equal shapes"):
        ssim(np.zeros((8, 8)), np.zeros((8, 9)))
