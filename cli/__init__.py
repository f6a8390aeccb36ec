"""Shared command-line plumbing: offline defaults, one-line errors, stats JSON, timing."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def offline_defaults() -> None:
    """Nothing on the default path may wait on an unreachable hub: ``HF_HUB_OFFLINE=1`` unless the caller set it.

    Called by :func:`run_cli` before a command's ``main`` (and so before it imports the hub
    libraries); ``export HF_HUB_OFFLINE=0`` allows downloads.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UserError(Exception):
    """Bad input: reported as one line, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: ...``) instead of usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main`` and turn bad input into ``error: <what is wrong and what to do>`` + exit 2."""
    offline_defaults()
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def load_or_explain(what: str, path_or_id: str, loader: Callable[[], Any]) -> Any:
    """Call ``loader``; a missing directory or an unreachable hub id becomes one clear line."""
    try:
        return loader()
    except (OSError, ValueError) as error:
        local = Path(path_or_id).exists()
        hint = (
            "the directory exists but is not a complete diffusers/transformers model directory"
            if local
            else "no such local directory, and the hub is offline here (HF_HUB_OFFLINE=1); pass a local path"
        )
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load {what} from {path_or_id!r}: {hint} ({first_line[:200]})") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


class ModuleTimer:
    """Sums the wall time spent inside ``module.forward`` (via the public forward-hook API)."""

    def __init__(self, module):
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _before(self, *_):
        self._start = time.perf_counter()

    def _after(self, *_):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def stopwatch():
    box = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def configure_torch_threads(threads: int | None, model_path: str | None, device: str | None) -> None:
    """``--threads`` if given; else one thread for the embedded tiny model on CPU.

    The tiny model's matmuls are too small to gain from a second thread, and on a busy 2-core
    machine two threads per process make it up to ~100x slower (measured); real models keep
    torch's default.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif model_path is None and not (device or "cpu").startswith("cuda") and not torch.cuda.is_available():
        torch.set_num_threads(1)


def load_video_or_explain(video: str | None, num_frames: int):
    """``(path, LoadedVideo)`` for ``video`` (default: the generated demo video); a bad video is one line."""
    from pipelines.video_io import load_video

    if video is None:
        from data.demo_video import demo_video_path

        video = demo_video_path()
    try:
        return video, load_video(video, num_frames)
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from None


def load_reference_image(path: Path | None):
    """The RGB reference image at ``path`` (None: the generated sample image); unreadable -> one line."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        from data.media import make_sample_image

        return make_sample_image()
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"cannot read image {str(path)!r} ({type(error).__name__}): pass a PNG/JPEG file") from None


def load_edit_pipeline(args):
    """``(pipeline, model path, device)`` for edit-script ``args``: ``--model-path`` (default: the embedded tiny
    model), ``--lora`` / ``--lora-weight-name``, ``--device``, ``--cpu-offload``, ``--vae-tiling``."""
    import torch

    from pipelines.qwenimage_edit import TokenPruningQwenImageEditPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.model_path is None:
        from models.tiny.qwenimage_edit import tiny_qwenimage_edit_dir

        model_path = str(tiny_qwenimage_edit_dir())
    else:
        model_path = args.model_path
    pipe = load_or_explain(
        "the Qwen-Image-Edit pipeline",
        model_path,
        lambda: TokenPruningQwenImageEditPipeline.from_pretrained(
            model_path, lora=args.lora, lora_weight_name=args.lora_weight_name, dtype=dtype
        ),
    )
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    return pipe, model_path, device


def machine_info(torch_module, device) -> dict:
    """The machine a run's numbers come from (written into every stats JSON)."""
    import os
    import platform

    import transformers

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch_module.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_module.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch_module.cuda.get_device_name(device)
    return info
