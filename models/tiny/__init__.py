"""Embedded default models: tiny, deterministic, built in code, loaded with ``from_pretrained``.

No model hub is reachable on the project's machines, so every command and test defaults to a
tiny model of the real architecture. Each one is built once by a ``build_*`` function
(config -> model with seeded weights, tokenizer and processor made in code), written with
``save_pretrained`` into a cache directory, and from then on always loaded back with the
same ``from_pretrained`` call a user with real weights makes. Weights depend only on the
seed, so the directory is the same on every machine.

Cache location: ``$PRUNING_MODELS_CACHE`` or ``<repo>/.cache/tiny_models``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("PRUNING_MODELS_CACHE", REPO_ROOT / ".cache" / "tiny_models"))


def cached_model_dir(name: str, version: int, build: Callable[[Path], None]) -> Path:
    """Return ``<cache>/<name>-v<version>``, building it with ``build(tmp_dir)`` if missing.

    The build writes into a temporary directory that is renamed into place only when
    complete, so an interrupted build never leaves a half-written model behind. Bump
    ``version`` whenever the builder's output changes.
    """
    target = cache_root() / f"{name}-v{version}"
    if (target / COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if target.exists():  # stale or concurrent build: replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@torch.no_grad()
def seeded_init_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Overwrite every parameter and floating buffer from a generator seeded per tensor name.

    Independent of module construction order and of the default initializers of the
    installed library version: weight = N(0, std) for matrices, 1 + N(0, std) for norm
    weights (1-D tensors whose name ends in ``weight``), N(0, std) for biases.
    """
    import zlib

    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or name.endswith("inv_freq"):
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
        if tensor.dim() == 1 and name.endswith("weight"):
            values += 1.0
        tensor.copy_(values.to(tensor.dtype))
