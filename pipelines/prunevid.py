"""PruneVid video question answering on Qwen2.5-VL: ``Qwen25VLPruneVid``.

::

    from pipelines.prunevid import Qwen25VLPruneVid

    pipe = Qwen25VLPruneVid(preset="default")                    # embedded tiny Qwen2.5-VL, CPU
    pipe = Qwen25VLPruneVid("Qwen/Qwen2.5-VL-7B-Instruct", preset="default", device="cuda")
    result = pipe.generate("clip.mp4", "What is the person doing?", max_new_tokens=64)
    result["generated_text"], result["tokens_before_stage1"], result["tokens_after"], result["ttft_s"]

The model is the FORK ``models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration``
loaded with ``from_pretrained`` (exactly like upstream: any Qwen2.5-VL directory or hub id) with its
``AutoProcessor``. Each call runs ``generate`` inside ``with prunevid(model, config):``
(:mod:`pruning.video.runtime`), which attaches PruneVid for that call only; the ``baseline`` configuration
attaches nothing, i.e. runs the unmodified upstream code path. Decoding is greedy. Batch size 1 (one video,
one question per call) is the contract.

Presets (:data:`PRESETS`, from :mod:`pruning.video.prunevid`; ``preset="custom"`` = ``default`` + your
overrides)::

    baseline      every stage off: the unpruned model
    stage2_only   attention pruning alone: keep 0.4 after layer 10 (of 28), KV cache compressed
    stage1_only   token merging alone: tau 0.8 / cluster 0.5 / segment 0.25
    default       tau 0.8 / cluster 0.5 / segment 0.25, keep 0.4 after layer 10, KV compressed
    conservative  tau 0.9 / cluster 0.8 / segment 0.5,  keep 0.6  (precision first)
    aggressive    tau 0.7 / cluster 0.3 / segment 0.25, keep 0.3

``pruning_layer``: left at ``None``, the preset's layer (10, tuned for the 28 layers of
Qwen2.5-VL-7B) is moved to the same depth of the loaded model by the rule every system uses
(:func:`pruning.common.scale_layer_index`: the layer ending nearest depth ``(10 + 1) / 28``; 10 for 7B,
1 for the 6-layer embedded model). An explicit value is used as given and must be ``< num_layers``.

Result of :meth:`Qwen25VLPruneVid.generate` (a dict):

* ``generated_text``, ``generated_ids``;
* ``tokens_before_stage1`` / ``tokens_after_stage1``: video tokens entering / leaving stage 1;
  ``tokens_before`` / ``tokens_after``: visual tokens entering / leaving stage 2;
  ``total_compression_ratio = 1 - tokens_after / tokens_before_stage1``;
* ``prompt_tokens``, ``kv_cache_length_per_layer`` (after prefill), ``kv_cache_bytes`` (after prefill);
* ``ttft_s``: time to first token (vision encoder + prefill + first logits, measured from the call to
  ``model.generate`` to its first logits-processor call); ``decode_tokens_per_s``: the following
  tokens over the time after the first; ``generate_s``;
* ``peak_memory_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` during the call (peak reset
  first); on CPU the peak resident set size of the whole process sampled every 5 ms during the call
  (weights and Python included, so differences between presets are what matters);
  ``peak_memory_kind`` says which;
* ``preset``, ``config`` (every knob), ``pruning_layer``, ``importance`` (how it was computed).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from pipelines.video_io import LoadedVideo, load_video
from pruning.common import check_int, scale_layer_index
from pruning.video.prunevid import PRESET_NAMES, PRESETS, PruneVidConfig, preset as make_preset

__all__ = [
    "Qwen25VLPruneVid",
    "PRESETS",
    "PRESET_NAMES",
    "REFERENCE_NUM_LAYERS",
    "scaled_pruning_layer",
    "load_model_and_processor",
    "load_config_and_processor",
    "check_device",
    "context_length",
    "check_prompt_fits",
    "build_inputs",
    "prompt_text_tokens",
    "build_prompt",
    "build_multiple_choice_question",
]

logger = logging.getLogger("pipelines.prunevid")

REFERENCE_NUM_LAYERS = 28
"""Depth of Qwen2.5-VL-7B, for which the presets' ``pruning_layer = 10`` is tuned."""

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STAGE1_KNOBS = ("tau", "cluster_ratio", "temporal_segment_ratio", "k_neighbors", "segmentation", "cluster_count")
"""Knobs only stage 1 (spatial-temporal merging) reads: ignored when ``enable_stage1`` is off."""
STAGE2_KNOBS = ("keep_ratio", "pruning_layer", "selection")
"""Knobs only stage 2 (attention pruning) reads: ignored when ``enable_pruning`` is off."""
_KNOBS = (
    "enable_stage1", "tau", "cluster_ratio", "temporal_segment_ratio", "enable_pruning", "keep_ratio",
    "pruning_layer", "enable_cache_compression", "selection", "k_neighbors", "segmentation", "cluster_count",
)  # fmt: skip


def scaled_pruning_layer(preset_layer: int, num_layers: int) -> int:
    """The preset's layer (tuned for 28 layers) at the same depth of a ``num_layers`` model: the layer ending
    nearest the same depth fraction, by the rule every system uses (:func:`pruning.common.scale_layer_index`):
    10 of 28 -> 1 of 6, 2 of 8, 13 of 36."""
    return scale_layer_index(preset_layer, REFERENCE_NUM_LAYERS, num_layers)


def _resolve_model_path(model_path: str | Path | None) -> str:
    if model_path is None:
        from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_dir

        return str(tiny_qwen2_5_vl_dir())
    return str(model_path)


def _explain_load_error(model_path: str, error: Exception) -> ValueError:
    """One line: what could not be loaded and why (incomplete directory; offline by setting or hub unreachable)."""
    from cli import hub_status

    local = Path(model_path).exists()
    hint = (
        "the directory exists but is not a complete Qwen2.5-VL model directory (config, weights, processor)"
        if local
        else f"no such local directory, and {hub_status()}: pass a local path"
    )
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return ValueError(f"cannot load Qwen2.5-VL from {model_path!r}: {hint} ({first})")


def load_config_and_processor(model_path: str | Path | None):
    """``(model config, AutoProcessor)`` of a Qwen2.5-VL directory or hub id, WITHOUT the weights (cheap).

    Enough to check everything that depends on the model before loading it: the layer count
    (``pruning_layer``), the context length (:func:`context_length`) and the prompt's token count
    (:func:`build_inputs`). A path that cannot be loaded raises a one-line ``ValueError``.
    """
    from transformers import AutoConfig, AutoProcessor

    model_path = _resolve_model_path(model_path)
    try:
        config = AutoConfig.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as error:
        raise _explain_load_error(model_path, error) from None
    if getattr(config, "model_type", None) != "qwen2_5_vl":
        raise ValueError(f"{model_path!r} is a {config.model_type!r} model, not Qwen2.5-VL")
    return config, processor


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (``None``: keep the default); one-line ``ValueError``."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available on this machine; use device='cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use device='cpu'")
    elif parsed.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported here: use 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def context_length(model_config) -> int:
    """The language model's context in tokens (``max_position_embeddings``): prompt + new tokens must fit in it."""
    return int(model_config.get_text_config().max_position_embeddings)


def check_prompt_fits(prompt_tokens: int, video_tokens: int | None, max_new_tokens: int, context: int) -> None:
    """One-line ``ValueError`` when ``prompt_tokens + max_new_tokens`` exceeds the model's ``context``.

    Nothing is truncated silently: a question (or list of options) too long for the model is an error
    that says how long the prompt is, what it is made of, and what to shorten.
    """
    if prompt_tokens + max_new_tokens <= context:
        return
    parts = (
        f" ({prompt_tokens - video_tokens} of question and chat template + {video_tokens} video tokens)"
        if video_tokens is not None
        else " (question and chat template, before the video tokens)"
    )
    fixes = "shorten the question, sample fewer frames" if video_tokens is not None else "shorten the question or options"
    raise ValueError(
        f"the prompt is {prompt_tokens} tokens{parts}; with max_new_tokens={max_new_tokens} it exceeds the "
        f"model's context of {context} tokens (max_position_embeddings): {fixes} or generate fewer tokens"
    )


def load_model_and_processor(model_path: str | Path | None, device=None, dtype=None, attn_implementation=None, processor=None):
    """``(fork model in eval mode, AutoProcessor)`` from a Qwen2.5-VL directory or hub id (``None``: the embedded tiny one).

    A path or hub id that cannot be loaded raises one-line ``ValueError`` saying why and what to do
    (including whether the hub is offline by setting or could not be reached). ``processor``: one
    already loaded from the same path (by :func:`load_config_and_processor`), reused.
    """
    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    model_path = _resolve_model_path(model_path)
    checked = check_device(device)
    device = checked if checked is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if processor is None:
        _, processor = load_config_and_processor(model_path)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise _explain_load_error(model_path, error) from None
    if getattr(model.config, "model_type", None) != "qwen2_5_vl":
        raise ValueError(f"{model_path!r} is a {model.config.model_type!r} model, not Qwen2.5-VL")
    return model.to(device).eval(), processor


def build_prompt(processor, question: str) -> str:
    """The Qwen2.5-VL-Instruct chat prompt for one video and one question (default system prompt)."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@contextmanager
def _no_tokenizer_length_warning():
    """The tokenizer's own "longer than the maximum sequence length" warning is replaced by :func:`check_prompt_fits`'s
    one-line error (which also counts the video tokens and the new tokens)."""
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def build_inputs(processor, video: LoadedVideo, question: str) -> dict[str, torch.Tensor]:
    """Processor inputs (CPU tensors) for one video and one question; needs no model weights."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    prompt = build_prompt(processor, question)
    with _no_tokenizer_length_warning():
        return dict(processor(videos=[video.frames], video_metadata=[video.metadata], text=prompt, return_tensors="pt"))


def prompt_text_tokens(processor, question: str) -> int:
    """Tokens of the chat prompt for ``question`` with the video placeholder unexpanded (no video needed)."""
    with _no_tokenizer_length_warning():
        return len(processor.tokenizer(build_prompt(processor, question), add_special_tokens=False).input_ids)


def build_multiple_choice_question(question: str, options: Sequence[str]) -> str:
    """EgoSchema-style prompt text: the question, lettered options, and the instruction to answer with a letter."""
    lines = [question.strip(), "Options:"]
    lines += [f"({OPTION_LETTERS[i]}) {str(option).strip()}" for i, option in enumerate(options)]
    lines.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(lines)


class _StepTimer:
    """A logits processor that only records the time of each decoding step (and the KV lengths after prefill)."""

    def __init__(self, cache):
        self.cache = cache
        self.times: list[float] = []
        self.kv_lengths: list[int] | None = None

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        if self.kv_lengths is None:
            self.kv_lengths = [self.cache.get_seq_length(i) for i in range(len(self.cache.layers))]
        return scores


class _PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the process's sampled peak RSS on CPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.peak = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_sampled"
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB (lifetime peak)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return False


def _reject_ignored_knobs(config: PruneVidConfig, overrides: dict, preset_name: str) -> None:
    """A knob passed explicitly for a stage that ``config`` leaves off would be silently ignored: one-line ``ValueError``."""
    for stage, switch, knobs, presets in (
        ("stage 1 (token merging)", "enable_stage1", STAGE1_KNOBS, "stage1_only, default, conservative, aggressive"),
        ("stage 2 (attention pruning)", "enable_pruning", STAGE2_KNOBS, "stage2_only, default, conservative, aggressive"),
    ):
        ignored = [name for name in knobs if name in overrides]
        if ignored and not getattr(config, switch):
            given = ", ".join(f"{name}={overrides[name]!r}" for name in ignored)
            raise ValueError(
                f"{given} would be ignored: {preset_name} has {stage} off; use preset='custom' or a preset with it on "
                f"({presets}), or pass {switch}=True"
            )


def _enable_verbose_logging() -> None:
    for name in ("pruning.video.prunevid", "pipelines.prunevid"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        if not log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
            log.addHandler(handler)


STAGE1_SPLIT_KEYS = (
    "static_tokens_before_stage1",
    "dynamic_tokens_before_stage1",
    "static_tokens_after_stage1",
    "dynamic_tokens_after_stage1",
)


class Qwen25VLPruneVid:
    """PruneVid (stage 1 merging, stage 2 pruning at ``pruning_layer``, stage 3 KV compression) on Qwen2.5-VL.

    Configuration: start from ``preset`` (a name in :data:`PRESET_NAMES` or a
    :class:`~pruning.video.prunevid.PruneVidConfig`; ``None`` = ``"default"``), then every knob passed
    explicitly (not ``None``) overrides it. Invalid values raise a one-line ``ValueError``, before any
    weights are loaded: an unknown or unavailable ``device``, a knob out of range, a ``pruning_layer``
    past the model's last layer (read from its config), and a knob that the configuration would ignore
    (a stage-1 knob with stage 1 off, a stage-2 knob with stage 2 off: pick a preset with that stage on,
    ``"custom"``, or switch the stage on explicitly). A prompt longer than the model's context is a
    ``ValueError`` from :meth:`prepare_inputs` / :meth:`generate_from_inputs` (never truncated).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        enable_stage1: bool | None = None,
        tau: float | None = None,
        cluster_ratio: float | None = None,
        temporal_segment_ratio: float | None = None,
        enable_pruning: bool | None = None,
        keep_ratio: float | None = None,
        pruning_layer: int | None = None,
        enable_cache_compression: bool | None = None,
        selection: str | None = None,
        num_frames: int = 16,
        preset: str | PruneVidConfig | None = None,
        verbose: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        k_neighbors: int | None = None,
        segmentation: str | None = None,
        cluster_count: str | None = None,
        *,
        selector=None,
        _model=None,
        _processor=None,
    ):
        check_int("num_frames", num_frames, lo=1)
        self.selector = selector  # stage 2: None = PruneVid's own selection; else any selector of pruning.selection
        self.last_state = None  # the PruneVidState of the last generate (None: nothing attached yet, or the baseline)
        if _model is None:
            check_device(device)
        overrides = {
            name: value
            for name, value in dict(
                enable_stage1=enable_stage1, tau=tau, cluster_ratio=cluster_ratio,
                temporal_segment_ratio=temporal_segment_ratio, enable_pruning=enable_pruning, keep_ratio=keep_ratio,
                pruning_layer=pruning_layer, enable_cache_compression=enable_cache_compression, selection=selection,
                k_neighbors=k_neighbors, segmentation=segmentation, cluster_count=cluster_count,
            ).items()
            if value is not None
        }  # fmt: skip
        # An explicit stage switch implies the defaults that make it valid (stage 3 needs stage 2).
        if overrides.get("enable_pruning") is False and "enable_cache_compression" not in overrides:
            overrides["enable_cache_compression"] = False
        base = preset if preset is not None else "default"
        if isinstance(base, PruneVidConfig):
            self.preset_name = "custom"
            config = replace(base, **overrides)
        else:
            if base not in PRESET_NAMES:
                raise ValueError(f"unknown PruneVid preset {base!r}; valid presets: {', '.join(PRESET_NAMES)}")
            self.preset_name = base
            config = make_preset(base, **overrides)
        _reject_ignored_knobs(
            config, overrides, "the given PruneVidConfig" if isinstance(base, PruneVidConfig) else f"preset {base!r}"
        )
        self.verbose = bool(verbose)
        if self.verbose:
            _enable_verbose_logging()
        self.num_frames = num_frames
        if _model is not None:
            model_config, processor = _model.config, _processor
        else:  # config and processor first (cheap): the layer check fails before the weights are read
            model_config, processor = load_config_and_processor(model_path)
            if _processor is not None:
                processor = _processor
        num_layers = model_config.get_text_config().num_hidden_layers
        if "pruning_layer" not in overrides:
            config = replace(config, pruning_layer=scaled_pruning_layer(config.pruning_layer, num_layers))
        self.config = config.validate_for_model(num_layers)
        self.num_layers = num_layers
        if _model is not None:
            self.model, self.processor = _model, _processor
        else:
            self.model, self.processor = load_model_and_processor(
                model_path, device, dtype, attn_implementation, processor=processor
            )
        self.model_path = str(model_path) if model_path is not None else "embedded tiny Qwen2.5-VL"

    # ------------------------------------------------------------------------------ construction helpers

    @property
    def device(self) -> torch.device:
        return self.model.device

    def with_config(self, preset: str | PruneVidConfig | None = None, **knobs) -> "Qwen25VLPruneVid":
        """Another pipeline on the SAME loaded model and processor (e.g. the baseline for a comparison)."""
        derived = Qwen25VLPruneVid(
            preset=preset, num_frames=knobs.pop("num_frames", self.num_frames), verbose=knobs.pop("verbose", self.verbose),
            selector=knobs.pop("selector", None), _model=self.model, _processor=self.processor, **knobs,
        )  # fmt: skip
        derived.model_path = self.model_path
        return derived

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={getattr(self.config, k)!r}" for k in _KNOBS)
        return f"Qwen25VLPruneVid({self.model_path!r}, preset={self.preset_name!r}, {knobs}, num_frames={self.num_frames})"

    # ------------------------------------------------------------------------------ inputs

    def load_video(self, video_path: str | Path) -> LoadedVideo:
        if isinstance(video_path, (list, tuple)):
            raise ValueError(
                f"Qwen25VLPruneVid handles one video per call (batch size 1), got {len(video_path)} videos: call it once per video"
            )
        return load_video(video_path, self.num_frames)

    @property
    def context_length(self) -> int:
        """The language model's context in tokens (``max_position_embeddings``)."""
        return context_length(self.model.config)

    def prepare_inputs(self, video: LoadedVideo | str | Path, question: str) -> dict[str, torch.Tensor]:
        """Processor inputs (``input_ids``, ``pixel_values_videos``, ``video_grid_thw``, ...) for one video and question.

        A prompt that leaves no room for one new token in the model's context raises a one-line ``ValueError``.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if not isinstance(video, LoadedVideo):
            video = self.load_video(video)
        inputs = build_inputs(self.processor, video, question)
        input_ids = inputs["input_ids"]
        video_tokens = int((input_ids == self.model.config.video_token_id).sum())
        check_prompt_fits(int(input_ids.shape[-1]), video_tokens, 1, self.context_length)
        return self._to_device(inputs)

    def _to_device(self, inputs: dict) -> dict:
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    # ------------------------------------------------------------------------------ generation

    def generate(self, video_path: str | Path, question: str, max_new_tokens: int = 64) -> dict[str, Any]:
        """Greedy answer to ``question`` about the video at ``video_path``, with statistics (see the module doc)."""
        inputs = self.prepare_inputs(self.load_video(video_path), question)
        return self.generate_from_inputs(inputs, max_new_tokens=max_new_tokens)

    @property
    def prunes(self) -> bool:
        """Any PruneVid stage on (else generation runs the upstream path with nothing attached)."""
        return self.config.any_stage_on

    @torch.no_grad()
    def generate_from_inputs(self, inputs: dict[str, torch.Tensor], max_new_tokens: int = 64) -> dict[str, Any]:
        """:meth:`generate` on ready processor inputs (batch size 1)."""
        check_int("max_new_tokens", max_new_tokens, lo=1)
        input_ids = inputs["input_ids"]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"Qwen25VLPruneVid supports batch size 1 (one video, one question), got input_ids of shape "
                f"{tuple(input_ids.shape)}: run the samples one at a time"
            )
        from transformers import LogitsProcessorList

        model_config = self.model.config
        video_tokens = int((input_ids == model_config.video_token_id).sum())
        if video_tokens == 0:
            raise ValueError("the inputs hold no video token: build them with prepare_inputs(video, question)")
        check_prompt_fits(int(input_ids.shape[1]), video_tokens, max_new_tokens, self.context_length)
        inputs = self._to_device(inputs)  # inputs built on CPU (build_inputs) move to the model's device
        from transformers import DynamicCache

        cache = DynamicCache(config=model_config)
        timer = _StepTimer(cache)
        generation_config = copy.deepcopy(self.model.generation_config)
        generation_config.do_sample = False
        for name in ("temperature", "top_p", "top_k"):
            setattr(generation_config, name, None)
        generation_config.max_new_tokens = max_new_tokens
        generation_config.return_dict_in_generate = True
        generation_config.output_logits = True
        logger.log(
            logging.INFO if self.verbose else logging.DEBUG,
            "generate: preset %s, prompt %d tokens (%d video tokens, video_grid_thw %s), max_new_tokens %d, %s",
            self.preset_name, input_ids.shape[1], video_tokens,
            inputs.get("video_grid_thw").tolist() if inputs.get("video_grid_thw") is not None else None,
            max_new_tokens, "PruneVid attached" if self.prunes else "nothing attached (upstream path)",
        )  # fmt: skip
        from pruning.video.runtime import prunevid

        attached = (
            prunevid(self.model, self.config, verbose=self.verbose, selector=self.selector)
            if self.prunes
            else contextlib.nullcontext()
        )
        with attached as runtime, _PeakMemory(self.device) as memory:
            start = time.perf_counter()
            out = self.model.generate(
                **inputs,
                past_key_values=cache,
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([timer]),
            )
            end = time.perf_counter()
        generated = out.sequences[0, input_ids.shape[1] :]
        text = self.processor.decode(generated, skip_special_tokens=True)
        self.last_state = runtime.state_for(cache) if runtime is not None else None  # what stage 1 / 2 decided
        stats = dict(self.last_state.stats) if self.last_state is not None else {}
        tokens_before_stage1 = stats.get("tokens_before_stage1", video_tokens)
        tokens_after_stage1 = stats.get("tokens_after_stage1", video_tokens)
        tokens_before = stats.get("tokens_before", tokens_after_stage1)
        tokens_after = stats.get("tokens_after", tokens_before)
        ttft = timer.times[0] - start if timer.times else end - start
        decode_s = timer.times[-1] - timer.times[0] if len(timer.times) > 1 else 0.0
        result = {
            "generated_text": text,
            "generated_ids": generated.tolist(),
            "preset": self.preset_name,
            "config": asdict(self.config),
            "pruning_layer": self.config.pruning_layer if self.config.enable_pruning else None,
            "num_layers": self.num_layers,
            "prompt_tokens": int(input_ids.shape[1]),
            "tokens_before_stage1": tokens_before_stage1,
            "tokens_after_stage1": tokens_after_stage1,
            "tokens_before": tokens_before,
            "tokens_after": tokens_after,
            "total_compression_ratio": 1.0 - tokens_after / tokens_before_stage1 if tokens_before_stage1 else 0.0,
            "kv_cache_length_per_layer": timer.kv_lengths,
            "kv_cache_bytes": stats.get("kv_cache_bytes"),
            "ttft_s": ttft,
            "decode_tokens_per_s": (len(timer.times) - 1) / decode_s if decode_s > 0 else None,
            "generate_s": end - start,
            "new_tokens": int(generated.numel()),
            "peak_memory_bytes": memory.peak,
            "peak_memory_kind": memory.kind,
            "importance": stats.get("importance"),
            "num_segments": stats.get("num_segments"),
            **{key: stats.get(key) for key in STAGE1_SPLIT_KEYS},
        }
        if result["kv_cache_bytes"] is None and timer.kv_lengths is not None:
            # baseline: every layer holds the full prompt; bytes from the cache's shapes after prefill
            layer = cache.layers[0]
            per_token = 2 * layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
            result["kv_cache_bytes"] = per_token * sum(timer.kv_lengths)
        self._last_logits = out.logits
        logger.log(
            logging.INFO if self.verbose else logging.DEBUG,
            "result: visual tokens %d -> %d -> %d, compression %.1f%%, TTFT %.3f s, %s tokens/s, KV per layer %s",
            tokens_before_stage1, tokens_after_stage1, tokens_after, 100 * result["total_compression_ratio"], ttft,
            f"{result['decode_tokens_per_s']:.1f}" if result["decode_tokens_per_s"] else "-", timer.kv_lengths,
        )  # fmt: skip
        return result

    # ------------------------------------------------------------------------------ EgoSchema

    def process_egoschema_sample(
        self, video_path: str | Path, question: str, options: Sequence[str], max_new_tokens: int = 8
    ) -> tuple[int, str, dict[str, Any]]:
        """Multiple choice: ``(prediction index, generated text, stats)``.

        The prompt lists the options as ``(A) ... (E)`` and asks for the letter. The prediction is the
        option whose letter token has the highest logit at the first generated position (always a
        valid option, as in lmms-eval's likelihood-style scoring); ``stats`` also holds
        ``prediction_letter``, ``option_logits`` and ``answer_from_text`` (the letter the generated text
        starts with, if any).
        """
        if isinstance(options, str) or not isinstance(options, Sequence) or not 2 <= len(options) <= len(OPTION_LETTERS):
            raise ValueError(f"options must be a list of 2..{len(OPTION_LETTERS)} strings, got {options!r}")
        letters = OPTION_LETTERS[: len(options)]
        letter_ids = []
        for letter in letters:
            ids = self.processor.tokenizer(letter, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"the tokenizer splits option letter {letter!r} into {len(ids)} tokens; cannot score options")
            letter_ids.append(ids[0])
        stats = self.generate(video_path, build_multiple_choice_question(question, options), max_new_tokens=max_new_tokens)
        first_logits = self._last_logits[0][0].float()
        option_logits = first_logits[letter_ids]
        prediction = int(option_logits.argmax())
        text = stats["generated_text"]
        stripped = text.strip().lstrip("(")
        stats.update(
            prediction_letter=letters[prediction],
            option_logits=option_logits.tolist(),
            answer_from_text=stripped[0] if stripped[:1] in letters and stripped[:1] else None,
        )
        return prediction, text, stats
