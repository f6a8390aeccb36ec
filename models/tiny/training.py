"""What every trainer of an embedded testbed shares: the learning-rate schedule, the optimiser step, and the
checkpoint that ``--resume`` continues from (model state, optimiser, schedule, step, JSON log, settings)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` times the peak at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, parameters, clip: float) -> None:
    """Backward, gradient-norm clipping at ``clip`` (0: none), one optimiser and one schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(list(parameters), clip)
    optimizer.step()
    scheduler.step()


def save_checkpoint(checkpoint: Path, *, modules: dict[str, torch.nn.Module], optimizer, scheduler, step: int,
                    record: dict, settings: dict) -> None:
    """Every state a resumed run needs, written atomically, and the JSON log beside it (``.json``)."""
    from cli import save_torch, write_json

    save_torch({**{name: module.state_dict() for name, module in modules.items()}, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "record": record, "settings": settings},
               Path(checkpoint))
    write_json(Path(checkpoint).with_suffix(".json"), record)


def resume_checkpoint(checkpoint: Path, *, modules: dict[str, torch.nn.Module], optimizer, scheduler, settings: dict,
                      log: Callable[[str], None] = print) -> tuple[dict, int]:
    """Load a :func:`save_checkpoint` file into ``modules``, ``optimizer`` and ``scheduler``; ``(record, step)``.
    A checkpoint written with other settings is refused (``ValueError``): it would not continue the same run."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state["settings"] != settings:
        raise ValueError(f"checkpoint {checkpoint} was written with other settings: {state['settings']}")
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log(f"resumed from {checkpoint} at step {state['step']}")
    return state["record"], state["step"]
