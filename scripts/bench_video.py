#!/usr/bin/env python
"""Benchmark PruneVid presets against the baseline: LLM prefill time, TTFT, decode speed, KV cache, memory.

Not a test. Builds a Qwen2.5-VL whose language model has the 7B's *proportions* (28 layers,
pruning at layer 10, GQA 7:1, MLP ratio 18944/3584) with its width and its visual token count
divided by one ``--scale`` factor (default 8: hidden 448 = 7 heads x 64, 1 KV head, MLP 2368;
16 frames -> 8 grid steps x 32 = 256 visual tokens instead of 2048), random weights, the real
processor and the demo video. Every preset runs in the same process as the baseline
(warm-up, then interleaved repeats, median). The measured prefill speedup of the LLM is printed
next to the analytic FLOP ratio of the same shapes and of the real 7B shapes (with this run's
token fractions).

Next to each preset runs its **oracle**: transformers' own (upstream, unforked) text model holding the
same weights, run on random embeddings of exactly the lengths the preset's layers process (layers
0..K on the ``text + stage-1`` tokens, layers K+1.. on the ``text + stage-2`` tokens, each half with its
own KV cache), with no scoring, no clustering and no index bookkeeping: the time the kept lengths cost
by themselves. TTFT is broken down into the vision encoder, stage 1 (plus assembling the LLM's inputs:
the time between the vision encoder's end and the language model's start) and the LLM prefill.

    python scripts/bench_video.py
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

from cli import ArgumentParser, UserError, check_output_file, run_cli, write_json

# 16 frames of (width, height) px -> 8 grid steps x (h/28 x w/28) = 2048 / scale visual tokens
FRAME_SIZE = {8: (224, 112), 4: (224, 224)}
PRESETS = ("baseline", "stage2_only", "stage1_only", "default", "conservative", "aggressive")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=8, choices=(4, 8), help="divide width and visual tokens by this")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stats-json", type=Path, default=Path("outputs_bench/bench_video.json"))
    return p.parse_args(argv)


def build_scaled_model(save_dir: Path, scale: int) -> None:
    """The tiny vision tower + a language model at the 7B's proportions / ``scale``; saved with its processor."""
    from models.tiny import seeded_init_
    from models.tiny.qwen2_5_vl import build_qwen2_5_vl_processor, tiny_qwen2_5_vl_config
    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    config = tiny_qwen2_5_vl_config()
    text = config.text_config
    head_dim = 128 if scale == 4 else 64
    text.hidden_size = 3584 // scale
    text.num_attention_heads = text.hidden_size // head_dim
    text.num_key_value_heads = max(1, text.num_attention_heads // 7)
    text.intermediate_size = 18944 // scale
    text.num_hidden_layers = 28
    text.max_window_layers = 28
    text.layer_types = ["full_attention"] * 28
    half = head_dim // 2
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
    config.vision_config.out_hidden_size = text.hidden_size
    model = Qwen2_5_VLForConditionalGeneration(config)
    seeded_init_(model, seed=0, std=0.05)
    model.save_pretrained(save_dir)
    processor = build_qwen2_5_vl_processor()
    width, height = FRAME_SIZE[scale]
    processor.video_processor.max_pixels = width * height
    processor.video_processor.size = {"shortest_edge": 56 * 56, "longest_edge": width * height}
    processor.save_pretrained(save_dir)


class Oracle:
    """The upstream text model in two halves (layers ``0..K`` and ``K+1..``), sharing the benchmarked model's weights
    by copy, timed on random embeddings of given lengths: ``prefill_s(first_length, rest_length)``."""

    def __init__(self, language_model, pruning_layer: int | None):
        import copy

        import torch
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        config = language_model.config
        num_layers = config.num_hidden_layers
        split = num_layers if pruning_layer is None else pruning_layer + 1
        weights = language_model.state_dict()
        self.halves = []
        for first, last in ((0, split), (split, num_layers)):
            if first == last:
                continue
            half_config = copy.deepcopy(config)
            half_config.num_hidden_layers = last - first
            half_config.layer_types = config.layer_types[first:last]
            half = Qwen2_5_VLTextModel(half_config).to(dtype=language_model.dtype, device=language_model.device)
            state = {}
            for key, value in weights.items():
                if key.startswith("layers.") and first <= int(key.split(".")[1]) < last:
                    _, index, rest = key.split(".", 2)
                    state[f"layers.{int(index) - first}.{rest}"] = value
            state.update({k: v for k, v in weights.items() if k.startswith("norm.")})
            missing, unexpected = half.load_state_dict(state, strict=False)
            assert not unexpected and all(k.startswith("embed_tokens") for k in missing), (missing, unexpected)
            if last < num_layers:
                half.norm = torch.nn.Identity()  # the norm runs once, after the last layer
            self.halves.append(half.eval())
        self.hidden = config.hidden_size
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, embeds, rest_length: int):
        """``[1, first_length, D]`` embeddings -> ``[1, rest_length, D]`` last hidden state (the first ``rest_length``
        rows go on after layer K)."""
        import torch
        from transformers import DynamicCache

        hidden = embeds
        for index, half in enumerate(self.halves):
            if index:
                hidden = hidden[:, :rest_length]
            positions = torch.arange(hidden.shape[1], device=hidden.device).view(1, 1, -1).expand(3, 1, -1)
            hidden = half(inputs_embeds=hidden, position_ids=positions, past_key_values=DynamicCache(),
                          use_cache=True).last_hidden_state
        return hidden

    def prefill_s(self, first_length: int, rest_length: int) -> float:
        import torch

        weight = self.halves[0].layers[0].self_attn.q_proj.weight
        embeds = torch.randn(1, first_length, self.hidden, generator=self.generator).to(weight.device, weight.dtype)
        with torch.no_grad():  # as generate()
            start = time.perf_counter()
            hidden = self.forward(embeds, rest_length)
            if hidden.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise UserError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}")
    if "baseline" not in presets:
        presets.insert(0, "baseline")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_new_tokens < 2:
        raise UserError(f"--max-new-tokens must be >= 2 (decode speed needs a second token), got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_output_file(args.stats_json, "--stats-json")  # before the model is built: a bad path writes nothing

    import torch
    from tqdm import tqdm

    from models.tiny import cached_model_dir
    from data.demo_video import write_demo_video
    from pipelines.prunevid import Qwen25VLPruneVid
    from evaluation.flops import Qwen2_5_VLTextShape, qwen2_5_vl_prefill_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = cached_model_dir(f"bench_qwen2_5_vl_s{args.scale}", 1, lambda d: build_scaled_model(d, args.scale))
    video_path = Path(model_dir) / "bench_video.avi"
    if not video_path.exists():
        write_demo_video(video_path, num_frames=16, size=FRAME_SIZE[args.scale])

    base = Qwen25VLPruneVid(model_path=model_dir, preset="baseline", num_frames=16)
    pipes = {name: base if name == "baseline" else base.with_config(name) for name in presets}
    inputs = base.prepare_inputs(video_path, "What is moving in the video, and in which direction?")
    language_model = base.model.model.language_model
    marks: dict = {"calls": []}

    def before(*_):
        marks["start"] = time.perf_counter()
        if not marks["calls"]:
            marks["prefill_start"] = marks["start"]

    def after(*_):
        marks["calls"].append(time.perf_counter() - marks["start"])  # first call: prefill; then one per decode step

    vision = base.model.model.visual

    def vision_start(*_):
        marks["vision_start"] = time.perf_counter()

    def vision_end(*_):
        marks["vision_end"] = time.perf_counter()

    handles = [language_model.register_forward_pre_hook(before), language_model.register_forward_hook(after),
               vision.register_forward_pre_hook(vision_start), vision.register_forward_hook(vision_end)]
    oracles: dict = {}

    def run(name: str) -> dict:
        marks["calls"] = []
        result = pipes[name].generate_from_inputs(inputs, max_new_tokens=args.max_new_tokens)
        result["llm_prefill_s"] = marks["calls"][0]
        result["llm_decode_step_s"] = statistics.median(marks["calls"][1:]) if len(marks["calls"]) > 1 else None
        result["vision_s"] = marks["vision_end"] - marks["vision_start"]
        result["stage1_s"] = marks["prefill_start"] - marks["vision_end"]  # stage 1 + assembling the LLM's inputs
        return result

    def run_oracle(name: str, result: dict) -> float:
        layer = result["pruning_layer"] if result["tokens_after"] < result["tokens_after_stage1"] else None
        if layer not in oracles:
            oracles[layer] = Oracle(language_model, layer)
        text = result["prompt_tokens"] - result["tokens_before_stage1"]
        return oracles[layer].prefill_s(text + result["tokens_after_stage1"], text + result["tokens_after"])

    results: dict[str, list[dict]] = {name: [] for name in presets}
    for name in presets:  # warm-up
        run_oracle(name, run(name))
    for _ in tqdm(range(args.repeats), desc="repeat (every preset and its oracle once)", unit="repeat"):
        for name in presets:
            result = run(name)
            result["oracle_prefill_s"] = run_oracle(name, result)
            results[name].append(result)
    for handle in handles:
        handle.remove()

    text_cfg = base.model.config.get_text_config()
    first = results["baseline"][0]
    text_tokens = first["prompt_tokens"] - first["tokens_before_stage1"]
    scaled = Qwen2_5_VLTextShape(num_layers=text_cfg.num_hidden_layers, hidden=text_cfg.hidden_size,
                                 num_heads=text_cfg.num_attention_heads, num_kv_heads=text_cfg.num_key_value_heads,
                                 intermediate=text_cfg.intermediate_size, text_tokens=text_tokens,
                                 visual_tokens=first["tokens_before_stage1"])
    real = Qwen2_5_VLTextShape()

    def med(name, key):
        values = [r[key] for r in results[name] if r[key] is not None]
        return statistics.median(values) if values else None

    rows = []
    for name in presets:
        r0 = results[name][0]
        layer = r0["pruning_layer"] if r0["pruning_layer"] is not None else scaled.pruning_layer
        v0, v1, v2 = r0["tokens_before_stage1"], r0["tokens_after_stage1"], r0["tokens_after"]
        shape = Qwen2_5_VLTextShape(**{**vars(scaled), "pruning_layer": layer})
        flops_scaled = qwen2_5_vl_prefill_flops(shape, v1, v2) / qwen2_5_vl_prefill_flops(shape, v0, v0)
        f1, f2 = v1 / v0, v2 / v0
        flops_real = qwen2_5_vl_prefill_flops(real, round(real.visual_tokens * f1), round(real.visual_tokens * f2)) / \
            qwen2_5_vl_prefill_flops(real, real.visual_tokens, real.visual_tokens)
        rows.append(dict(
            preset=name, visual_tokens=[v0, v1, v2], kept_fraction=f2,
            llm_prefill_s=med(name, "llm_prefill_s"), ttft_s=med(name, "ttft_s"),
            oracle_prefill_s=med(name, "oracle_prefill_s"), vision_s=med(name, "vision_s"), stage1_s=med(name, "stage1_s"),
            decode_tokens_per_s=med(name, "decode_tokens_per_s"), kv_cache_bytes=r0["kv_cache_bytes"],
            peak_memory_bytes=max(r["peak_memory_bytes"] for r in results[name]), peak_memory_kind=r0["peak_memory_kind"],
            flops_ratio_scaled=flops_scaled, flops_ratio_real=flops_real,
            kv_cache_length_per_layer=r0["kv_cache_length_per_layer"],
        ))
    b = rows[0]
    for r in rows:
        r["prefill_speedup"] = b["llm_prefill_s"] / r["llm_prefill_s"]
        r["ttft_speedup"] = b["ttft_s"] / r["ttft_s"]
        r["decode_speedup"] = (r["decode_tokens_per_s"] or 0) / b["decode_tokens_per_s"] if b["decode_tokens_per_s"] else None
        r["kv_cache_ratio"] = r["kv_cache_bytes"] / b["kv_cache_bytes"]
        r["prefill_fraction_of_bound"] = r["prefill_speedup"] * r["flops_ratio_scaled"]
        r["prefill_over_oracle"] = r["llm_prefill_s"] / r["oracle_prefill_s"]
        r["ttft_over_oracle_plus_vision"] = r["ttft_s"] / (r["oracle_prefill_s"] + r["vision_s"])

    print(f"\nscale 1/{args.scale}: hidden {scaled.hidden} ({scaled.num_heads} heads, {scaled.num_kv_heads} KV), MLP "
          f"{scaled.intermediate}, {scaled.num_layers} layers; prompt {first['prompt_tokens']} tokens = "
          f"{first['tokens_before_stage1']} visual + {text_tokens} text; torch threads {torch.get_num_threads()}")
    print(f"{'preset':<13} {'visual tokens':<16} {'prefill':>8} {'speedup':>8} {'bound':>6} {'of bound':>8} "
          f"{'oracle':>7} {'/oracle':>7} {'TTFT x':>7} {'decode x':>8} {'KV':>6} {'bound 7B':>8}")
    for r in rows:
        v = "->".join(map(str, r["visual_tokens"]))
        print(f"{r['preset']:<13} {v:<16} {r['llm_prefill_s']:>7.3f}s {r['prefill_speedup']:>7.2f}x "
              f"{1 / r['flops_ratio_scaled']:>5.2f}x {r['prefill_fraction_of_bound']:>7.0%} {r['oracle_prefill_s']:>6.3f}s "
              f"{r['prefill_over_oracle']:>7.2f} {r['ttft_speedup']:>6.2f}x "
              f"{(r['decode_speedup'] or 0):>7.2f}x {r['kv_cache_ratio']:>6.2f} {1 / r['flops_ratio_real']:>7.2f}x")
    print(f"\nTTFT breakdown (s): {'preset':<13} {'vision':>7} {'stage 1':>8} {'LLM prefill':>11} {'rest':>6} {'TTFT':>6} "
          f"{'TTFT / (oracle + vision)':>25}")
    for r in rows:
        rest = r["ttft_s"] - r["vision_s"] - (r["stage1_s"] or 0) - r["llm_prefill_s"]
        print(f"{'':<20} {r['preset']:<13} {r['vision_s']:>7.3f} {r['stage1_s']:>8.3f} {r['llm_prefill_s']:>11.3f} "
              f"{rest:>6.3f} {r['ttft_s']:>6.3f} {r['ttft_over_oracle_plus_vision']:>25.2f}")
    write_json(args.stats_json, dict(
        command="python scripts/bench_video.py " + " ".join(argv or []),
        machine=dict(platform=platform.platform(), processor=platform.processor(), torch=torch.__version__,
                     threads=torch.get_num_threads()),
        scaled_shape=vars(scaled), real_shape=vars(real), repeats=args.repeats, max_new_tokens=args.max_new_tokens,
        rows=rows,
    ))
    print(f"stats in {args.stats_json}")
    return 0


if __name__ == "__main__":
    import sys

    run_cli(lambda: main(sys.argv[1:]))
