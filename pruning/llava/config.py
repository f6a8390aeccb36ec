"""Configuration of system C: two-stage learned pruning for LLaVA-1.5.

Dataclasses with validated ranges, one per concern, grouped by ``VisionTokenPruningConfig``;
``load_config`` reads ``configs/vision_token_pruning.yaml``.

YAML layout
-----------
Every key carries the method's flat name (``merger_type``, ``merge_ratio``, ..., ``lr_merger``).
A file may either list the keys flat at the top level, or group them in sections named after
the fields of ``VisionTokenPruningConfig`` (``merger``, ``pruner``, ``anneal``, ``discriminator``,
``loss``, ``optim``, ``train``); both forms may be mixed. Key names are unique across sections,
so a flat key is routed to its section by name; a key placed in the wrong section, an unknown
key, an unknown section, a wrong type or an out-of-range value raises ``ConfigError`` (a
``ValueError``) whose message is one line naming the key, the bad value and what is allowed.
Keys left out keep their defaults. Floats may be written ``2e-5`` (PyYAML reads that as a
string; numeric strings are accepted for float keys).

Token budget (documented choice for ``keep_ratios``)
----------------------------------------------------
``keep_ratios[i]`` is the fraction of the vision tokens *entering* pruning layer
``pruning_layers[i]`` that survive it (relative to the tokens still alive, not to the merger
output), so the count is the same whether dropped tokens are physically removed or only
masked. Counts round half up and never drop the last token. The published description's claimed trajectory
for text+vision tokens is 676 -> 388 -> ~300 -> ~250 -> ~200; with ~100 text tokens, that is
576 -> 288 vision tokens at the merger, then ~200, ~150, ~100. The defaults
``[0.7, 0.75, 0.67]`` give 288 -> 202 -> 152 -> 102 vision tokens (302, 252, 202 with 100 text
tokens); see ``vision_token_trajectory``.

Additions beyond the published method (documented defaults): ``merger_d_internal``/``merger_num_heads``
(the merger's internal width), ``keep_ratios``, ``discriminator_d_hidden``,
``discriminator_hidden_layer``, ``budget_loss_weight`` (0.0: the published three-term objective
is unchanged), the optimiser's ``weight_decay``/``grad_clip_norm`` and the ``train`` section.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import yaml

from pruning.common import check_int, round_half_up, scale_layer_index

MERGER_TYPES = ("simple", "question_aware")
MIXED_PRECISION = ("no", "fp16", "bf16")


class ConfigError(ValueError):
    """A configuration key is unknown, mistyped or out of range (one-line message)."""


# ----------------------------------------------------------------------------- validators


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _check_float(
    key: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, hi_name: str = ""
) -> None:
    text = "a number in " + ("(" if lo_open else "[") + f"{lo:g}, {hi_name}{hi:g}" + (")" if hi_open else "]")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, text)
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = value >= hi if hi_open else value > hi
    if bad_lo or bad_hi:
        _fail(key, value, text)


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(key, value, " | ".join(repr(c) for c in choices))


# ----------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class MergerConfig:
    """Stage 1: the learnable token merger between the CLIP tower and the projector.

    ``target_merge_tokens`` is the exact output count for the real 576-token tower (576 -> 288);
    ``null`` means ``round(merge_ratio * N)``. ``resolve_num_tokens`` gives the count for a
    tower of any size (the tiny embedded model has 64 tokens).
    """

    merger_type: str = "simple"  # "simple": importance from the vision features alone; "question_aware": + question
    merge_ratio: float = 0.5  # (0, 1]; 576 * 0.5 = 288
    target_merge_tokens: int | None = 288  # >= 1, or None to use merge_ratio
    merger_d_internal: int = 512  # width of the importance head and of the assignment Q/K
    merger_num_heads: int = 4  # heads of the question cross-attention (question_aware)
    merger_prior_scale: float = 3.0  # initial weight of the distinctiveness prior in the importance logits; >= 0

    def __post_init__(self) -> None:
        _check_choice("merger_type", self.merger_type, MERGER_TYPES)
        _check_float("merge_ratio", self.merge_ratio, 0.0, 1.0, lo_open=True)
        if self.target_merge_tokens is not None:
            check_int("target_merge_tokens", self.target_merge_tokens, lo=1, error=ConfigError)
        check_int("merger_d_internal", self.merger_d_internal, lo=1, error=ConfigError)
        check_int("merger_num_heads", self.merger_num_heads, lo=1, error=ConfigError)
        _check_float("merger_prior_scale", self.merger_prior_scale, 0.0, math.inf, hi_open=True)
        if self.merger_d_internal % self.merger_num_heads:
            _fail("merger_num_heads", self.merger_num_heads, f"a divisor of merger_d_internal={self.merger_d_internal}")

    def resolve_num_tokens(self, num_tokens: int, num_tokens_real: int = 576) -> int:
        """Merged-token count for a tower emitting ``num_tokens`` tokens.

        ``target_merge_tokens`` counts tokens of the real ``num_tokens_real``-token tower; another
        tower gets the same fraction, ``round_half_up(target * num_tokens / num_tokens_real)``,
        clamped to ``[1, num_tokens]``. With ``target_merge_tokens=None``:
        ``round_half_up(merge_ratio * num_tokens)`` clamped the same way.
        """
        if num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens} must be >= 1")
        if self.target_merge_tokens is None:
            m = round_half_up(self.merge_ratio * num_tokens)
        elif num_tokens == num_tokens_real:
            m = self.target_merge_tokens
        else:
            m = round_half_up(self.target_merge_tokens * num_tokens / num_tokens_real)
        return min(max(m, 1), num_tokens)


@dataclass(frozen=True)
class PrunerConfig:
    """Stage 2: pruner heads inside the LLM (layer indices of the real 32-layer Vicuna-7B)."""

    pruning_layers: tuple[int, ...] = (10, 20, 31)  # strictly increasing, >= 0
    pruner_d_internal: int = 512
    pruner_num_heads: int = 4  # must divide pruner_d_internal
    keep_ratios: tuple[float, ...] = (0.7, 0.75, 0.67)  # per layer, of the tokens entering it; (0, 1]
    pruner_prior_scale: float = 3.0  # initial weight of the distinctiveness prior in the keep logits; >= 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pruning_layers", _as_tuple("pruning_layers", self.pruning_layers))
        object.__setattr__(self, "keep_ratios", _as_tuple("keep_ratios", self.keep_ratios))
        if not self.pruning_layers:
            _fail("pruning_layers", list(self.pruning_layers), "a non-empty list of layer indices")
        for layer in self.pruning_layers:
            check_int("pruning_layers", layer, lo=0, error=ConfigError)
        if any(b <= a for a, b in zip(self.pruning_layers, self.pruning_layers[1:])):
            _fail("pruning_layers", list(self.pruning_layers), "strictly increasing layer indices")
        check_int("pruner_d_internal", self.pruner_d_internal, lo=1, error=ConfigError)
        check_int("pruner_num_heads", self.pruner_num_heads, lo=1, error=ConfigError)
        _check_float("pruner_prior_scale", self.pruner_prior_scale, 0.0, math.inf, hi_open=True)
        if self.pruner_d_internal % self.pruner_num_heads:
            _fail("pruner_num_heads", self.pruner_num_heads, f"a divisor of pruner_d_internal={self.pruner_d_internal}")
        if len(self.keep_ratios) != len(self.pruning_layers):
            _fail("keep_ratios", list(self.keep_ratios), f"one ratio per pruning layer ({len(self.pruning_layers)})")
        for r in self.keep_ratios:
            _check_float("keep_ratios", r, 0.0, 1.0, lo_open=True)


@dataclass(frozen=True)
class TemperatureConfig:
    """Annealing of the Gumbel-top-k / soft-assignment temperature (see ``temperature_at``)."""

    temperature: float = 1.0  # at step 0; (0, 100]
    temperature_min: float = 0.1  # at the final step; (0, temperature]
    temperature_anneal_rate: float = 0.5  # time constant of the decay, as a fraction of the run; (0, 100]

    def __post_init__(self) -> None:
        _check_float("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        _check_float("temperature_min", self.temperature_min, 0.0, self.temperature, lo_open=True, hi_name="temperature=")
        _check_float("temperature_anneal_rate", self.temperature_anneal_rate, 0.0, 100.0, lo_open=True)


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The discriminator over LLM hidden states of the text tokens (real: unpruned, fake: pruned)."""

    discriminator_d_hidden: int = 256
    discriminator_hidden_layer: int = -1  # index into ``output_hidden_states``; -1 = final layer (after norm)

    def __post_init__(self) -> None:
        check_int("discriminator_d_hidden", self.discriminator_d_hidden, lo=1, error=ConfigError)
        check_int("discriminator_hidden_layer", self.discriminator_hidden_layer, error=ConfigError)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the generator objective (merger + pruners); the published 1.0 / 25.0 / 1e-4."""

    adv_loss_weight: float = 1.0
    task_loss_weight: float = 25.0
    merge_sparsity_weight: float = 1e-4
    budget_loss_weight: float = 0.0  # an addition; 0 keeps the published three-term objective
    feature_match_weight: float = 0.0  # an addition: paired feature matching (pruned vs unpruned answer-row states)
    attention_distill_weight: float = 0.0  # an addition: selection scores distilled from the unpruned answer attention

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_float(f.name, getattr(self, f.name), 0.0, 1e6)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW learning rates, one parameter group per module family."""

    lr_merger: float = 2e-5
    lr_pruners: float = 2e-5
    lr_discriminator: float = 5e-4
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        for key in ("lr_merger", "lr_pruners", "lr_discriminator"):
            _check_float(key, getattr(self, key), 0.0, 1.0, lo_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_float("grad_clip_norm", self.grad_clip_norm, 0.0, 1e6)


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (runs under Hugging Face Accelerate)."""

    max_steps: int = 200
    batch_size: int = 4  # per device
    grad_accum_steps: int = 1
    discriminator_steps: int = 1  # discriminator updates per generator update
    eval_every: int = 50  # 0 disables
    save_every: int = 100  # 0 disables
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (Accelerate)
    output_dir: str = "runs/vision_token_pruning"

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum_steps", "discriminator_steps", "log_every"):
            check_int(key, getattr(self, key), lo=1, error=ConfigError)
        for key in ("eval_every", "save_every", "seed"):
            check_int(key, getattr(self, key), lo=0, error=ConfigError)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail("output_dir", self.output_dir, "a non-empty path string")


@dataclass(frozen=True)
class VisionTokenPruningConfig:
    """Everything system C reads; the field names are the YAML section names."""

    merger: MergerConfig = field(default_factory=MergerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    anneal: TemperatureConfig = field(default_factory=TemperatureConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sectioned plain dict (tuples as lists), the same layout ``load_config`` reads."""
        out = asdict(self)
        for section in out.values():
            for k, v in section.items():
                if isinstance(v, tuple):
                    section[k] = list(v)
        return out


def _as_tuple(key: str, value: Any) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    _fail(key, value, "a list")
    raise AssertionError  # unreachable


# ----------------------------------------------------------------------------- loading

_SECTION_CLASSES: dict[str, type] = {
    "merger": MergerConfig,
    "pruner": PrunerConfig,
    "anneal": TemperatureConfig,
    "discriminator": DiscriminatorConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}
_KEY_TO_SECTION: dict[str, str] = {f.name: s for s, cls in _SECTION_CLASSES.items() for f in fields(cls)}
_FLOAT_KEYS = {
    f.name for cls in _SECTION_CLASSES.values() for f in fields(cls) if isinstance(f.default, float)
}


def _coerce(key: str, value: Any) -> Any:
    """Numeric strings for float keys (``2e-5`` is a string to PyYAML); lists of them too."""
    def one(v: Any) -> Any:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return v

    if key in _FLOAT_KEYS:
        return one(value)
    if key == "keep_ratios" and isinstance(value, list):
        return [one(v) for v in value]
    return value


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> VisionTokenPruningConfig:
    """Build the config from a flat and/or sectioned mapping (the YAML layout; see module doc)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping of keys or sections, got {type(data).__name__}")
    per_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_CLASSES}
    allowed = "sections " + ", ".join(_SECTION_CLASSES) + " or keys " + ", ".join(_KEY_TO_SECTION)

    def put(section: str, key: str, value: Any) -> None:
        if key in per_section[section]:
            raise ConfigError(f"{source}: key {key!r} given twice (flat and in section {section!r})")
        per_section[section][key] = _coerce(key, value)

    for top, value in data.items():
        if top in _SECTION_CLASSES:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section {top!r} must be a mapping, got {value!r}")
            section_keys = [f.name for f in fields(_SECTION_CLASSES[top])]
            for key, v in value.items():
                if key not in section_keys:
                    where = f"; it belongs in section {_KEY_TO_SECTION[key]!r}" if key in _KEY_TO_SECTION else ""
                    raise ConfigError(
                        f"{source}: unknown key {key!r} in section {top!r}{where}; allowed keys: {', '.join(section_keys)}"
                    )
                put(top, key, v)
        elif top in _KEY_TO_SECTION:
            put(_KEY_TO_SECTION[top], top, value)
        else:
            raise ConfigError(f"{source}: unknown key {top!r}; allowed: {allowed}")
    try:
        built = {s: cls(**per_section[s]) for s, cls in _SECTION_CLASSES.items()}
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return VisionTokenPruningConfig(**built)


def load_config(path: str | os.PathLike[str]) -> VisionTokenPruningConfig:
    """Read ``configs/vision_token_pruning.yaml`` (or another file in the same layout)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (expected a YAML file like configs/vision_token_pruning.yaml)")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            one_line = " ".join(str(exc).split())
            raise ConfigError(f"{path}: not valid YAML: {one_line}") from None
    return config_from_dict({} if data is None else data, source=path)


# ----------------------------------------------------------------------------- schedules


def temperature_at(step: int, total_steps: int, cfg: TemperatureConfig) -> float:
    """Temperature at optimisation step ``step`` of ``total_steps`` (steps 0 .. total_steps - 1).

    Normalised exponential decay with time constant ``r = temperature_anneal_rate`` (a fraction
    of the run): with progress ``p = step / (total_steps - 1)``,

        tau(p) = tau_min + (tau_0 - tau_min) * (exp(-p / r) - exp(-1 / r)) / (1 - exp(-1 / r)),

    i.e. ``exp(-p / r)`` rescaled so that ``tau(0) = temperature`` and ``tau(1) =
    temperature_min`` exactly (the endpoints are returned as given). Small ``r`` anneals fast
    (soft early, hard for most of the run), large ``r`` tends to a linear ramp; ``r = 0.5``
    gives 0.59 / 0.34 / 0.19 at a quarter / half / three quarters with 1.0 -> 0.1.
    Monotone non-increasing in ``step``; steps outside ``[0, total_steps - 1]`` clamp; with
    ``total_steps == 1`` the only step is step 0 (``temperature``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    last = total_steps - 1
    if step <= 0 or last == 0:
        return cfg.temperature
    if step >= last:
        return cfg.temperature_min
    p, r = step / last, cfg.temperature_anneal_rate
    # (e^{-p/r} - e^{-1/r}) / (1 - e^{-1/r}) written with expm1 (no cancellation for large r).
    frac = math.exp(-p / r) * math.expm1(-(1.0 - p) / r) / math.expm1(-1.0 / r)
    frac = min(max(frac, 0.0), 1.0)
    return cfg.temperature_min + (cfg.temperature - cfg.temperature_min) * frac


def scale_pruning_layers(
    layers: Sequence[int], num_layers_real: int = 32, num_layers_model: int | None = None
) -> list[int]:
    """Map layer indices of a ``num_layers_real``-layer LLM to the same depths of a smaller one.

    Each layer is mapped by the rule every system uses, :func:`pruning.common.scale_layer_index`
    (the layer ending nearest the same depth fraction ``(l + 1) / num_layers_real``). Collisions
    are then resolved by pushing later layers one deeper and, where that runs past the end,
    pulling earlier ones shallower, so the result is strictly increasing and in range.
    ``[10, 20, 31]`` of 32 -> ``[2, 4, 7]`` of 8. ``num_layers_model=None`` validates and
    returns ``layers`` for the real model.
    """
    layers = list(layers)
    if num_layers_model is None:
        num_layers_model = num_layers_real
    if num_layers_real < 1 or num_layers_model < 1:
        raise ValueError(f"layer counts must be >= 1, got num_layers_real={num_layers_real}, num_layers_model={num_layers_model}")
    if any(not 0 <= l < num_layers_real for l in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers={layers} must be strictly increasing indices in [0, {num_layers_real - 1}]")
    if len(layers) > num_layers_model:
        raise ValueError(f"cannot place {len(layers)} pruning layers in a {num_layers_model}-layer model")
    out = [scale_layer_index(l, num_layers_real, num_layers_model) for l in layers]
    n = len(out)
    for i in range(1, n):
        out[i] = max(out[i], out[i - 1] + 1)
    for i in range(n - 1, -1, -1):
        out[i] = min(out[i], num_layers_model - n + i, out[i + 1] - 1 if i + 1 < n else num_layers_model - 1)
    return out


def keep_count(num_alive: int, keep_ratio: float) -> int:
    """Tokens kept out of ``num_alive``: ``round_half_up(keep_ratio * num_alive)`` in ``[1, num_alive]`` (0 if none alive)."""
    if num_alive <= 0:
        return 0
    return min(max(round_half_up(keep_ratio * num_alive), 1), num_alive)


def vision_token_trajectory(num_vision_tokens: int, cfg: VisionTokenPruningConfig, num_tokens_real: int = 576) -> list[int]:
    """Vision-token counts: tower output, after the merger, after each pruning layer.

    Default config, real tower: ``[576, 288, 202, 152, 102]``.
    """
    counts = [num_vision_tokens, cfg.merger.resolve_num_tokens(num_vision_tokens, num_tokens_real)]
    for ratio in cfg.pruner.keep_ratios:
        counts.append(keep_count(counts[-1], ratio))
    return counts


__all__ = [
    "ConfigError",
    "DiscriminatorConfig",
    "LossConfig",
    "MergerConfig",
    "OptimConfig",
    "PrunerConfig",
    "TemperatureConfig",
    "TrainConfig",
    "VisionTokenPruningConfig",
    "config_from_dict",
    "keep_count",
    "load_config",
    "scale_pruning_layers",
    "temperature_at",
    "vision_token_trajectory",
]
