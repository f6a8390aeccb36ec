"""System A: reuse of reference-image token states across denoising steps (Qwen-Image-Edit)."""
