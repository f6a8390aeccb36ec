"""Image fidelity against the baseline output: PSNR and SSIM (Wang et al. 2004)."""

from __future__ import annotations

import numpy as np


def _as_float01(image) -> np.ndarray:
    """PIL image / uint8 array / float array in [0, 1] -> float64 array [H, W, C] in [0, 1]."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float64) / 255.0
    array = array.astype(np.float64)
    if array.ndim == 2:
        array = array[..., None]
    return array


def psnr(reference, test, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    a, b = _as_float01(reference), _as_float01(test)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter2d(channel: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter of a 2-D array."""
    from scipy.signal import convolve2d

    return convolve2d(convolve2d(channel, window[None, :], mode="valid"), window[:, None], mode="valid")


def ssim(reference, test, data_range: float = 1.0) -> float:
    """Mean structural similarity over channels (11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03)."""
    a, b = _as_float01(reference), _as_float01(test)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    side = min(11, a.shape[0], a.shape[1])
    window = _gaussian_window(size=side if side % 2 else side - 1)  # 11x11, or the largest odd size that fits
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for c in range(a.shape[2]):
        x, y = a[..., c], b[..., c]
        mu_x, mu_y = _filter2d(x, window), _filter2d(y, window)
        sxx = _filter2d(x * x, window) - mu_x**2
        syy = _filter2d(y * y, window) - mu_y**2
        sxy = _filter2d(x * y, window) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
        den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))
