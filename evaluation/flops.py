"""Analytic FLOP counts (1 multiply-add = 2 FLOPs) for the pruned and unpruned forward passes.

Only the terms that scale with sequence length are counted (projections, attention scores,
attention-weighted values, MLPs); modulation Linears on the time embedding, norms, RoPE and
softmax are lower order and left out, which makes every ratio slightly pessimistic for the
unpruned baseline. Shapes follow the real models' configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pruning.edit.reference_reuse import validate_mode


@dataclass(frozen=True)
class QwenImageShape:
    """Token counts and widths of one Qwen-Image(-Edit) transformer call."""

    num_blocks: int = 60
    dim: int = 3072  # 24 heads x 128
    mlp_ratio: int = 4
    denoise_len: int = 4096  # L1: 1024x1024 output -> 64x64 packed latents
    reference_len: int = 4096  # L2: reference image at ~1024x1024 area
    text_len: int = 200  # Edit-2509/2511 prompts; ~1.4k for the original Edit template
    out_features: int = 64  # proj_out: patch 2 x 2 x 16 latent channels

    @classmethod
    def from_transformer_config(cls, config, tokens: dict[str, int]) -> "QwenImageShape":
        """Shapes of a real call: a QwenImageTransformer2DModel config and the run's token counts."""
        return cls(
            num_blocks=config.num_layers,
            dim=config.num_attention_heads * config.attention_head_dim,
            denoise_len=tokens["denoise"],
            reference_len=tokens["reference"],
            text_len=tokens["text"],
            out_features=config.patch_size**2 * (config.out_channels or config.in_channels),
        )


def qwenimage_block_flops(shape: QwenImageShape, mode: str, reuse: bool) -> float:
    """FLOPs of one dual-stream block (batch 1) on a refresh (``reuse=False``) or reuse step."""
    validate_mode(mode)
    d, r = shape.dim, shape.mlp_ratio
    l1, l2, lt = shape.denoise_len, shape.reference_len, shape.text_len
    if not reuse or mode == "none":
        q_rows, kv_proj_rows, key_rows, out_rows, mlp_rows = l1 + l2, l1 + l2, l1 + l2, l1 + l2, l1 + l2
    elif mode == "mlp":
        q_rows, kv_proj_rows, key_rows, out_rows, mlp_rows = l1 + l2, l1 + l2, l1 + l2, l1 + l2, l1
    elif mode == "full":
        q_rows, kv_proj_rows, key_rows, out_rows, mlp_rows = l1, l1 + l2, l1 + l2, l1, l1
    else:  # kv
        q_rows, kv_proj_rows, key_rows, out_rows, mlp_rows = l1, l1, l1 + l2, l1, l1
    projections = 2 * d * d * (q_rows + 2 * kv_proj_rows + out_rows + 4 * lt)  # image q,k,v,out + text q,k,v,out
    attention = 2 * 2 * d * (lt + q_rows) * (lt + key_rows)  # Q.K^T and P.V
    mlps = 2 * 2 * r * d * d * (mlp_rows + lt)
    return float(projections + attention + mlps)


def qwenimage_call_flops(shape: QwenImageShape, mode: str, reuse: bool) -> float:
    """FLOPs of one transformer call: every block plus img_in/txt_in-free output projection."""
    rows_out = shape.denoise_len if (reuse and mode in ("full", "kv")) else shape.denoise_len + shape.reference_len
    return shape.num_blocks * qwenimage_block_flops(shape, mode, reuse) + 2.0 * shape.dim * shape.out_features * rows_out


def qwenimage_edit_flops_ratio(shape: QwenImageShape, mode: str, refresh_steps: tuple[int, ...], num_steps: int) -> float:
    """Pruned / baseline transformer FLOPs over a whole ``num_steps`` edit (CFG branches scale both alike)."""
    baseline = num_steps * qwenimage_call_flops(shape, "none", False)
    pruned = sum(qwenimage_call_flops(shape, mode, step not in refresh_steps) for step in range(1, num_steps + 1))
    return pruned / baseline


def qwenimage_component_flops(shape: QwenImageShape) -> dict[str, float]:
    """FLOPs of one block's parts on a full call: ``attn`` (image and text projections, scores, weighted values),
    ``img_mlp`` and ``txt_mlp``; they sum to ``qwenimage_block_flops(shape, "none", False)``."""
    d, r = shape.dim, shape.mlp_ratio
    image, text = shape.denoise_len + shape.reference_len, shape.text_len
    return {"attn": float(2 * d * d * 4 * (image + text) + 2 * 2 * d * (image + text) ** 2),
            "img_mlp": float(2 * 2 * r * d * d * image), "txt_mlp": float(2 * 2 * r * d * d * text)}


def qwenimage_counted_flops_ratio(shape: QwenImageShape, counts: dict[str, int], baseline_counts: dict[str, int]) -> float:
    """Real-shape FLOP ratio of a run whose executed block parts were counted (``pruning.edit.step_caches.WorkCounter``:
    attention / image MLP / text MLP calls over all blocks and steps) against the baseline's counts; each counted
    part costs what it costs at ``shape``. For step caches that skip whole blocks or their attention and MLPs."""
    parts = qwenimage_component_flops(shape)
    return sum(parts[k] * counts[k] for k in parts) / sum(parts[k] * baseline_counts[k] for k in parts)


@dataclass(frozen=True)
class Qwen2_5_VLTextShape:
    """The Qwen2.5-VL language model (7B by default) and one prompt's token counts."""

    num_layers: int = 28
    hidden: int = 3584
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate: int = 18944
    pruning_layer: int = 10
    text_tokens: int = 60
    visual_tokens: int = 2048  # 16 frames at 448x448: 8 grid steps x 16 x 16


def qwen2_5_vl_layer_flops(shape: Qwen2_5_VLTextShape, seq_len: int) -> float:
    """Prefill FLOPs of one decoder layer over ``seq_len`` tokens (causal attention: half the score matrix)."""
    d, head_dim = shape.hidden, shape.hidden // shape.num_heads
    kv = shape.num_kv_heads * head_dim
    projections = 2 * seq_len * (2 * d * d + 2 * d * kv)  # q, o; k, v
    mlp = 2 * seq_len * 3 * d * shape.intermediate  # gate, up, down
    attention = 2 * 2 * d * seq_len * seq_len / 2  # Q.K^T and P.V under the causal mask
    return float(projections + mlp + attention)


def qwen2_5_vl_prefill_flops(shape: Qwen2_5_VLTextShape, visual_after_stage1: int, visual_after_stage2: int) -> float:
    """LLM prefill FLOPs: layers 0..K over the stage-1 sequence, layers K+1.. over the stage-2 sequence.

    Stage 2's own cost (question-row queries against layer K's keys) is added; the vision
    encoder and the stage-1 clustering are not part of the LLM count.
    """
    l1 = shape.text_tokens + visual_after_stage1
    l2 = shape.text_tokens + visual_after_stage2
    k = shape.pruning_layer
    flops = (k + 1) * qwen2_5_vl_layer_flops(shape, l1) + (shape.num_layers - k - 1) * qwen2_5_vl_layer_flops(shape, l2)
    if visual_after_stage2 < visual_after_stage1:  # scoring: q_proj of the question rows + their scores over l1 keys
        flops += 2 * shape.text_tokens * shape.hidden * shape.hidden + 2 * shape.text_tokens * l1 * shape.hidden
    return float(flops)


def llm_prefill_flops(text_config, lengths: Sequence[int]) -> float:
    """Analytic prefill FLOPs of the decoder layers, layer ``i`` running on ``lengths[i]`` tokens.

    Per layer and token: Q/K/V/O projections and the SwiGLU MLP (2 FLOPs per MAC); attention scores
    and weighted values causally, ``~ L^2 / 2`` pairs per head dimension, Q.K and P.V.
    """
    d, h = text_config.hidden_size, text_config.num_attention_heads
    head_dim, kv_heads, ffn = d // h, text_config.num_key_value_heads, text_config.intermediate_size
    per_token = 2 * (d * h * head_dim + 2 * d * kv_heads * head_dim + h * head_dim * d + 3 * d * ffn)
    return float(sum(length * per_token + 2 * 2 * h * head_dim * length * (length + 1) / 2 for length in lengths))


# ----------------------------------------------------------------------------- LLaVA-1.5 (system C)


@dataclass(frozen=True)
class LlavaShape:
    """LLaVA-1.5-7B: Vicuna-7B (32 layers, 4096 hidden, MLP 11008, MHA), CLIP ViT-L/14-336 (576 tokens)."""

    num_layers: int = 32
    hidden: int = 4096
    mlp: int = 11008
    kv_hidden: int = 4096  # num_key_value_heads * head_dim (MHA in Vicuna-7B)
    num_vision: int = 576
    text_len: int = 60
    vision_dim: int = 1024  # CLIP ViT-L hidden (the merger's input)
    merger_internal: int = 512
    pruner_internal: int = 512


def llm_layer_flops(shape: LlavaShape, n_q: int, n_kv: int | None = None) -> float:
    """FLOPs (2 per MAC) of one decoder layer over ``n_q`` tokens attending to ``n_kv`` keys (prefill: n_kv = n_q).

    q/o projections ``2 n d^2``, k/v ``2 n d d_kv``, scores and weighted values ``2 n_q n_kv d``
    (full square, as the kernels compute it), gated MLP ``3 n d f``. Norms, RoPE, softmax: lower order.
    """
    n_kv = n_q if n_kv is None else n_kv
    d = shape.hidden
    macs = n_q * (2 * d * d + 2 * d * shape.kv_hidden + 3 * d * shape.mlp) + 2 * n_q * n_kv * d
    return 2.0 * macs


def prefill_flops(shape: LlavaShape, layer_vision_tokens: Sequence[int], merged: int | None = None,
                  pruner_layers: Sequence[int] = (), pruner_vision: Sequence[int] = ()) -> dict[str, float]:
    """Prefill FLOPs of the LLM (+ projector, merger and pruner-head overheads) for a per-layer vision schedule."""
    llm = sum(llm_layer_flops(shape, v + shape.text_len) for v in layer_vision_tokens)
    projected = shape.num_vision if merged is None else merged
    dv, d = shape.vision_dim, shape.hidden
    projector = 2.0 * projected * (dv * d + d * d)
    merger = 0.0
    if merged is not None:
        n, m, di = shape.num_vision, merged, shape.merger_internal
        merger = 2.0 * (n * dv * di * 3 + n * di * di + n * m * di + n * m * dv)  # in/q/k proj, importance, QK^T, merge
    heads = 0.0
    for v in pruner_vision:
        di = shape.pruner_internal
        heads += 2.0 * (v * d * di + shape.text_len * d * 2 * di + 2 * v * shape.text_len * di + v * di * di * 2)
    return {"llm": llm, "projector": projector, "merger": merger, "pruner_heads": heads,
            "total": llm + projector + merger + heads}
