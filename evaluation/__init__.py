"""Metrics (``metrics``: PSNR, SSIM) and analytic FLOP models at the real model sizes (``flops``)."""
