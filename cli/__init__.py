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


def hub_status() -> str:
    """Why a hub id could not be fetched: offline by setting, or (presumably) unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
        return "the hub is offline by setting (HF_HUB_OFFLINE=1; export HF_HUB_OFFLINE=0 to download)"
    return "the hub could not be reached or has no such repository (HF_HUB_OFFLINE=0)"


def load_or_explain(what: str, path_or_id: str, loader: Callable[[], Any]) -> Any:
    """Call ``loader``; a missing directory or an unreachable hub id becomes one clear line."""
    try:
        return loader()
    except (OSError, ValueError) as error:
        local = Path(path_or_id).exists()
        hint = (
            "the directory exists but is not a complete diffusers/transformers model directory"
            if local
            else f"no such local directory, and {hub_status()}; pass a local path"
        )
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load {what} from {path_or_id!r}: {hint} ({first_line[:200]})") from None


# ----------------------------------------------------------------------------- fail fast: inputs and outputs


def _first_existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output_file(path: Path | None, flag: str) -> None:
    """``path`` can be written as a file (before any work; nothing is created): one-line UserError otherwise."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory: pass a file path")
    parent = _first_existing_parent(path)
    if not parent.is_dir():
        raise UserError(f"{flag} {str(path)!r} lies under {str(parent)!r}, which is a file: pass a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {str(path)!r} is not writable: pass a path you can write to")


def check_output_dir(path: Path | None, flag: str) -> None:
    """``path`` is (or can become) a writable directory (nothing is created): one-line UserError otherwise."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file: pass a directory")
    existing = path if path.exists() else _first_existing_parent(path)
    if not existing.is_dir():
        raise UserError(f"{flag} {str(path)!r} lies under {str(existing)!r}, which is a file: pass a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {str(path)!r} is not writable: pass a directory you can write to")


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` that exists here (None: keep the caller's default)."""
    if device is None:
        return None
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (kind in ("cpu", "mps") and index) or (index and not index.isdigit()):
        raise UserError(f"{flag} {device!r} is not a device: use cpu, cuda, cuda:N or mps")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} mps: Apple's Metal backend is not available on this machine; use {flag} cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: no CUDA GPU is available on this machine; use {flag} cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0.."
                            f"cuda:{torch.cuda.device_count() - 1})")
    return device


def check_video_path(video: Path | None) -> None:
    """A video path given on the command line exists (None: the demo video); one-line UserError otherwise."""
    if video is None:
        return
    shown = str(video) if len(str(video)) <= 160 else f"{str(video)[:160]}..."
    try:
        exists = Path(video).exists()
    except OSError as error:  # e.g. a long question passed where the video path goes
        raise UserError(
            f"video {shown!r} is not a usable path ({error.strerror}): pass the video path first, then the question "
            f"(or -q QUESTION for the demo video)"
        ) from None
    if not exists:
        raise UserError(f"video {shown!r} does not exist: pass an existing video file (or none for the demo video)")


def check_video_prompt_against_model(model_path, video, question: str, max_new_tokens: int,
                                     pruning_layer: int | None):
    """Read a Qwen2.5-VL's config and processor (not its weights): ``--pruning-layer`` against its layer count,
    the prompt against its context, each a one-line UserError. Returns ``(processor, CPU inputs)``."""
    from pipelines.prunevid import build_inputs, check_prompt_fits, context_length, load_config_and_processor

    try:
        model_config, processor = load_config_and_processor(model_path)
    except ValueError as error:
        raise UserError(str(error).splitlines()[0]) from None
    num_layers = model_config.get_text_config().num_hidden_layers
    if pruning_layer is not None and pruning_layer >= num_layers:
        raise UserError(
            f"--pruning-layer: pruning_layer={pruning_layer} is out of range for a model with {num_layers} layers "
            f"(allowed 0..{num_layers - 1})"
        )
    inputs = build_inputs(processor, video, question)
    input_ids = inputs["input_ids"]
    video_tokens = int((input_ids == model_config.video_token_id).sum())
    try:
        check_prompt_fits(int(input_ids.shape[-1]), video_tokens, max_new_tokens, context_length(model_config))
    except ValueError as error:
        raise UserError(f"question / --num-frames / --max-new-tokens: {error}") from None
    return processor, inputs


# ----------------------------------------------------------------------------- write atomically


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (never a half-written file).

    A directory works too (``save_pretrained(tmp)``): the old one is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            import shutil

            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def save_image(image, path: Path) -> None:
    """``image.save(path)`` through a temporary file (format from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file: a kill during the save leaves the previous file intact."""
    import torch

    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON at ``path``, written through a temporary file."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


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


def set_torch_threads(threads: int | None) -> None:
    """``--threads`` if given, else torch's default (the LLaVA scripts: their batches gain from every core, and
    the recorded numbers in docs/BENCHMARKS.md were made with torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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


USER_IMAGE_PROMPT = "Make the red circle blue."
"""The instruction for a reference image given with ``-i`` and no ``-p``."""


def check_edit_choice(args) -> None:
    """``--edit-index`` (a generated test edit: >= 0, and not with ``-i``, which it would not be used with) and
    ``--reference-area`` (the pipelines' limits) of edit-script ``args``: one-line ``UserError``."""
    if args.edit_index is not None and (args.edit_index < 0 or args.input):
        raise UserError(f"--edit-index picks a generated test edit: a number >= 0, without -i; got {args.edit_index}"
                        + (" with -i" if args.input else ""))
    if args.reference_area is not None:
        from pipelines.qwenimage_edit_limits import EditInputError, check_reference_area

        try:
            check_reference_area(args.reference_area, "--reference-area")
        except EditInputError as error:
            raise UserError(str(error)) from None


def resolve_edit_inputs(args, testbed: bool):
    """``(reference images, target image or None, edit or None)`` for edit-script ``args`` (``input``: a list of
    paths or None, ``prompt``, ``edit_index``, ``reference_area``, ``height``, ``width``).

    Without ``-i``, the embedded testbed edits its held-out test edit ``--edit-index`` (default
    ``models.tiny.edit_testbed.DEMO_EDIT_INDEX``), whose target is then known; another model edits the generated
    sample image. Fills ``args.prompt`` (the edit's own instruction, else :data:`USER_IMAGE_PROMPT`), and for the
    testbed ``--reference-area`` / ``--height`` / ``--width`` (its 128x128) where they were not given; any other
    model encodes its reference at upstream's 1024x1024 by default."""
    from pipelines.qwenimage_edit_limits import REFERENCE_AREA

    sample = None
    if args.input:
        images = [load_reference_image(path) for path in args.input]
    elif testbed:
        from data.edit_task import make_edit
        from models.tiny.edit_testbed import DEMO_EDIT_INDEX

        sample = make_edit(0, "test", DEMO_EDIT_INDEX if args.edit_index is None else args.edit_index)
        images = [sample.source_image()]
    else:
        images = [load_reference_image(None)]
    if args.prompt is None:
        args.prompt = sample.instruction if sample is not None else USER_IMAGE_PROMPT
    if testbed:
        from models.tiny.edit_testbed import IMAGE_SIZE
        from models.tiny.edit_testbed import REFERENCE_AREA as TESTBED_AREA

        args.reference_area = args.reference_area or TESTBED_AREA
        if args.height is None and args.width is None:
            args.height = args.width = IMAGE_SIZE
    args.reference_area = args.reference_area or REFERENCE_AREA
    target = sample.target_image() if sample is not None and args.prompt == sample.instruction else None
    return images, target, sample


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


def edit_pipeline_choice(args):
    """``(pipeline class, model path)`` for edit-script ``args``, read before any weights: ``--model-path`` (default:
    the embedded trained testbed, ``models/trained/qwenimage_edit``; for several ``-i`` images or ``--pipeline plus``
    the embedded tiny Edit-2509-layout pipeline, random weights) and ``--pipeline`` (``auto``: the class
    ``model_index.json`` names; ``edit`` / ``plus``: that one).
    A choice the directory or the images contradict: one-line ``UserError``."""
    from pipelines.qwenimage_edit import (
        TokenPruningQwenImageEditPipeline,
        TokenPruningQwenImageEditPlusPipeline,
        edit_pipeline_class,
    )

    choice = getattr(args, "pipeline", "auto")
    inputs = getattr(args, "input", None)
    num_images = len(inputs) if isinstance(inputs, list) else 1
    wanted = {"edit": TokenPruningQwenImageEditPipeline, "plus": TokenPruningQwenImageEditPlusPipeline}.get(choice)
    if args.model_path is None:
        from models.tiny.edit_testbed import SHIPPED_DIR
        from models.tiny.qwenimage_edit import tiny_qwenimage_edit_plus_dir

        plus = choice == "plus" or (choice == "auto" and num_images > 1)
        model_path = str(tiny_qwenimage_edit_plus_dir() if plus else SHIPPED_DIR)
        pipeline_class = TokenPruningQwenImageEditPlusPipeline if plus else TokenPruningQwenImageEditPipeline
    else:
        model_path = args.model_path
        pipeline_class = load_or_explain("the Qwen-Image-Edit pipeline", model_path,
                                         lambda: edit_pipeline_class(model_path))
        if wanted is not None and pipeline_class is not wanted:
            raise UserError(f"--pipeline {choice}: {model_path!r} holds a {pipeline_class.stock_class.__name__} "
                            f"(model_index.json); pass --pipeline auto or a {wanted.stock_class.__name__} model")
    if num_images > 1 and pipeline_class is TokenPruningQwenImageEditPipeline:
        raise UserError(f"{num_images} -i images, but Qwen-Image-Edit takes one reference image: pass one, or use "
                        "an Edit-2509 / 2511 model (--pipeline plus for the embedded one)")
    return pipeline_class, model_path


def load_edit_pipeline(args):
    """``(pipeline, model path, device)`` for edit-script ``args``: the pipeline of :func:`edit_pipeline_choice`,
    ``--lora`` / ``--lora-weight-name``, ``--device``, ``--cpu-offload``, ``--vae-tiling``."""
    import torch

    pipeline_class, model_path = edit_pipeline_choice(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = load_or_explain(
        f"the {pipeline_class.stock_class.__name__}",
        model_path,
        lambda: pipeline_class.from_pretrained(
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


def write_outputs(writers: dict[Path, Callable[[Path], None]]) -> None:
    """All of a run's output files, or none: ``writers[path](tmp)`` writes each to a temporary name beside its
    path, and only when every one has been written are they all renamed into place.

    An exception or Ctrl-C while writing removes the temporary files and any directory this call created, so an
    interrupted run leaves neither half-written files nor images without their stats. (Image writers must name
    the format, e.g. ``image.save(tmp, format="PNG")``: the temporary name has no image suffix.)
    """
    from contextlib import ExitStack

    created: list[Path] = []
    for path in writers:
        missing = Path(path).absolute().parent
        while not missing.exists() and missing not in created:
            created.append(missing)
            missing = missing.parent
    try:
        with ExitStack() as stack:
            for path, write in writers.items():
                write(stack.enter_context(atomic_path(Path(path))))
    except BaseException:
        for directory in sorted(created, key=lambda p: len(p.parts), reverse=True):
            try:
                directory.rmdir()  # only if empty: never removes what someone else put there
            except OSError:
                pass
        raise


def check_model_path(model_path: str | None, flag: str = "--model-path") -> None:
    """``model_path`` is a local directory, or a hub id while the hub is online (before any load): one line otherwise."""
    if model_path is None:
        return
    path = Path(model_path)
    if path.is_dir():
        return
    if path.exists():
        raise UserError(f"{flag} {model_path!r} is a file: pass a model directory")
    looks_like_hub_id = model_path.count("/") == 1 and not model_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"{flag} {model_path!r}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{flag} {model_path!r}: no such local directory, and {hub_status()}")
