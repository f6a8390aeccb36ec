"""What the Qwen-Image-Edit pipeline accepts, in plain Python: the edit API and the edit CLIs check the same rules.

No torch or diffusers import here, so a command line can refuse bad input in a second, before it loads a model.
Every rule raises :class:`EditInputError` (a ``ValueError``) with one line that names the argument (``height``
in the API, ``--height`` on the command line), the rule, and where the limit comes from.

Where the numbers come from (diffusers 0.42.1, ``pipelines/qwenimage/pipeline_qwenimage_edit.py`` and
``models/transformers/transformer_qwenimage.py``):

* **16 px per token side**: the VAE downsamples 8x and the transformer packs 2x2 latent patches; the stock
  ``__call__`` silently rounds ``height``/``width`` down to a multiple of 16 (``17`` -> ``16``) and treats ``0``
  as "unset" (-> ~1024 px). Here both are errors.
* **max_image_seq_len**: the scheduler's dynamic time shift (``calculate_shift``) is a line fitted between
  ``base_image_seq_len`` (256) and ``max_image_seq_len`` output tokens (8192 in Qwen/Qwen-Image-Edit's
  ``scheduler_config.json`` and in the Lightning settings). Beyond it the shift is extrapolated: at 10000x10000 px
  (390,625 tokens) ``mu`` is ~20 and the sigmas become NaN after minutes of compute. 8192 tokens is e.g.
  1024x2048 or 1440x1440 px; Qwen-Image's own resolutions (1328x1328 = 6889 tokens, 1664x928 = 6032) lie inside.
* **4096 RoPE positions**: ``QwenEmbedRope`` builds a table of 4096 positions per axis. The image grids use
  ``max(h, w) // 2`` of them (centred, ``scale_rope``) and the text continues after them; text + image beyond 4096
  is the tensor-size RuntimeError of a very long prompt.
* **max_sequence_length** (default 512, at most 1024: the stock ``check_inputs`` cap): the stock edit pipeline
  documents it as the prompt's maximum length but never applies it; ``TokenPruningQwenImageEditPipeline``
  truncates the prompt to it with a warning, as the stock text-to-image ``QwenImagePipeline`` truncates its prompt.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

PIXELS_PER_TOKEN_SIDE = 16
"""The VAE's 8x downsampling times the transformer's 2x2 latent patches."""
REFERENCE_AREA = 1024 * 1024
"""The stock pipeline encodes the reference image at ~1 MP, whatever the output size."""
DEFAULT_MAX_IMAGE_SEQ_LEN = 8192
"""``max_image_seq_len`` of Qwen/Qwen-Image-Edit's scheduler config (and of the Lightning settings); used before
a hub model's own config can be read."""
ROPE_POSITIONS = 4096
"""Length of ``QwenEmbedRope``'s position table (``torch.arange(4096)``)."""
DEFAULT_MAX_SEQUENCE_LENGTH = 512
"""The stock ``__call__``'s default ``max_sequence_length``."""
MAX_SEQUENCE_LENGTH = 1024
"""The stock ``check_inputs`` refuses a larger ``max_sequence_length``."""
SIZE_EXAMPLES = "e.g. 1024x1024 = 4096 tokens, 1328x1328 = 6889, 1024x2048 = 8192"


class EditInputError(ValueError):
    """An argument of an edit outside what the pipeline supports (one line: the argument, the rule, the limit)."""


class LoRALoadError(RuntimeError):
    """The LoRA (not the model) could not be found or loaded; the message names the LoRA and why."""


# ----------------------------------------------------------------------------- sizes


def reference_dims(image_size: tuple[int, int], area: int = REFERENCE_AREA) -> tuple[int, int]:
    """``(width, height)`` at which the stock pipeline encodes a reference image of ``image_size`` (~1 MP), or at
    ``area`` px (the pipelines' ``reference_area``).

    The arithmetic of diffusers 0.42.1 ``calculate_dimensions(1024 * 1024, width / height)``.
    """
    ratio = image_size[0] / image_size[1]
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def check_reference_area(value, name: str = "reference_area") -> None:
    """``value`` is a whole number of px of at least 32 x 32 (the stock rounding of each side to 32 px)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 32 * 32:
        raise EditInputError(
            f"{name} must be the reference image's area in px, an integer >= {32 * 32} (32 x 32; each side is rounded "
            f"to 32 px), e.g. {REFERENCE_AREA} = 1024 x 1024 (upstream's) or {512 * 512} = 512 x 512; got {value!r}"
        )


def check_side(value, name: str, unset: str = "None") -> None:
    """``value`` is unset or a positive multiple of 16 px."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < PIXELS_PER_TOKEN_SIDE \
            or value % PIXELS_PER_TOKEN_SIDE:
        raise EditInputError(
            f"{name} must be a positive multiple of {PIXELS_PER_TOKEN_SIDE} px (the VAE's 8x downsampling times the "
            f"2x2 latent patches), or {unset} to follow the reference image's aspect ratio at ~1 MP; got {value!r}"
        )


def image_tokens(height: int, width: int) -> int:
    return (height // PIXELS_PER_TOKEN_SIDE) * (width // PIXELS_PER_TOKEN_SIDE)


def rope_image_extent(sizes: list[tuple[int, int]], scale_rope: bool = True) -> int:
    """RoPE positions the image grids take (``max_vid_index`` in ``QwenEmbedRope.forward``); sizes in px."""
    extent = 0
    for height, width in sizes:
        h, w = height // PIXELS_PER_TOKEN_SIDE, width // PIXELS_PER_TOKEN_SIDE
        extent = max(extent, h // 2, w // 2) if scale_rope else max(extent, h, w)
    return extent


def output_size(
    height: int | None,
    width: int | None,
    image_size: tuple[int, int],
    max_image_seq_len: int,
    names: tuple[str, str] = ("height", "width"),
    unset: str = "None",
    reference_area: int = REFERENCE_AREA,
) -> tuple[int, int]:
    """The ``(height, width)`` the stock pipeline will produce, after checking every size rule (see the module).

    An unset side follows the reference image at ~1 MP whatever ``reference_area`` (the area the reference is
    encoded at) is."""
    check_side(height, names[0], unset)
    check_side(width, names[1], unset)
    default_width, default_height = reference_dims(image_size)
    ref_width, ref_height = reference_dims(image_size, reference_area)
    out_height, out_width = height or default_height, width or default_width
    derived = [n for n, v in zip(names, (height, width)) if v is None]
    note = f" ({' and '.join(derived)} from the reference image's aspect ratio at ~1 MP)" if derived else ""
    tokens = image_tokens(out_height, out_width)
    if tokens > max_image_seq_len:
        raise EditInputError(
            f"{names[0]} x {names[1]} = {out_height} x {out_width} px{note} is {tokens} image tokens of 16x16 px; "
            f"the pipeline supports at most {max_image_seq_len} (the scheduler's max_image_seq_len, beyond which its "
            f"time shift is extrapolated and the sigmas degenerate; {SIZE_EXAMPLES})"
        )
    extent = rope_image_extent([(out_height, out_width), (ref_height, ref_width)])
    if extent >= ROPE_POSITIONS:
        raise EditInputError(
            f"{names[0]} x {names[1]} = {out_height} x {out_width} px{note} needs {extent} of the transformer's "
            f"{ROPE_POSITIONS} RoPE positions per axis for the image alone (each side / 32), leaving none for the "
            f"prompt: use a less elongated size"
        )
    return out_height, out_width


def max_image_seq_len_of(model_path: str | os.PathLike | None, lora: str | None = None) -> int:
    """The scheduler's ``max_image_seq_len`` that a pipeline loaded from ``model_path`` will have, without loading it.

    A LoRA switches to the Lightning settings (8192); a local model directory's ``scheduler_config.json`` is read;
    anything else (the embedded tiny model, a hub id) gets Qwen-Image-Edit's published 8192. The loaded pipeline
    checks again with its real scheduler.
    """
    if lora is None and model_path is not None:
        config = Path(model_path) / "scheduler" / "scheduler_config.json"
        if config.is_file():
            try:
                return int(json.loads(config.read_text()).get("max_image_seq_len", 4096))
            except (OSError, ValueError, TypeError):
                pass
    return DEFAULT_MAX_IMAGE_SEQ_LEN


def check_max_sequence_length(value, name: str = "max_sequence_length") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_SEQUENCE_LENGTH:
        raise EditInputError(
            f"{name} must be an integer from 1 to {MAX_SEQUENCE_LENGTH} prompt tokens (the stock pipeline's cap), "
            f"got {value!r}"
        )
    return int(value)


# ----------------------------------------------------------------------------- LoRA


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or source.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))
    )


def check_lora_source(lora: str | None, weight_name: str | None, names: tuple[str, str] = ("lora", "lora_weight_name")) -> None:
    """Everything about a LoRA source that can be known without loading it; :class:`LoRALoadError` otherwise.

    A local file; a local directory holding ``weight_name`` (or some ``.safetensors`` file); or a hub id
    ``owner/name``, which with the hub offline by setting must already be in the local hub cache.
    """
    if lora is None:
        if weight_name is not None:
            raise LoRALoadError(f"{names[1]} {weight_name!r} is given without {names[0]}: pass {names[0]} too")
        return
    from cli import hub_status

    path = Path(lora).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        if weight_name is not None and not (path / weight_name).is_file():
            raise LoRALoadError(f"{names[0]} {lora!r}: the LoRA directory has no file {names[1]}={weight_name!r}")
        if weight_name is None and not any(path.glob("*.safetensors")):
            raise LoRALoadError(f"{names[0]} {lora!r}: the LoRA directory has no .safetensors file; pass {names[1]}")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(lora)
        valid_id = not _looks_like_path(lora)
    except HFValidationError:
        valid_id = False
    if not valid_id:
        raise LoRALoadError(f"{names[0]} {lora!r}: no such LoRA file or directory (and not a hub id owner/name)")
    if _hub_offline():
        if weight_name is None:
            raise LoRALoadError(f"{names[0]} {lora!r} is not a local path, and {hub_status()}; pass a local LoRA file")
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(lora, weight_name), str):
            raise LoRALoadError(
                f"{names[0]} {lora!r} ({names[1]}={weight_name!r}) is not a local path nor in the local hub cache, "
                f"and {hub_status()}"
            )


def hub_failure_reason(error: BaseException) -> str:
    """Why a hub download failed, from the exception chain: offline by setting, unreachable, or no such file."""
    from cli import hub_status

    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    names = {cls.__name__ for ex in chain for cls in type(ex).__mro__}
    if _hub_offline() or "OfflineModeIsEnabled" in names:
        return hub_status()
    if any(isinstance(ex, (ConnectionError, TimeoutError)) for ex in chain) or names & {
        "ConnectError", "ConnectTimeout", "NetworkError", "TransportError", "LocalEntryNotFoundError", "gaierror",
    }:
        return "the hub could not be reached from here (HF_HUB_OFFLINE=0; check the network or proxy)"
    if names & {"RepositoryNotFoundError", "EntryNotFoundError", "RevisionNotFoundError", "GatedRepoError"}:
        return "the hub has no such repository or file, or it is gated (HF_HUB_OFFLINE=0)"
    return hub_status()


def explain_lora_failure(lora: str, weight_name: str | None, error: BaseException) -> LoRALoadError:
    """The one-line :class:`LoRALoadError` for an exception raised while loading ``lora``."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    what = f"the LoRA {lora!r}" + (f" (weight_name {weight_name!r})" if weight_name else "")
    if Path(lora).expanduser().exists():
        reason = "the path exists but holds no LoRA that fits this transformer"
    else:
        reason = f"not a local path, and {hub_failure_reason(error)}"
    return LoRALoadError(f"cannot load {what}: {reason} ({type(error).__name__}: {first_line})")
