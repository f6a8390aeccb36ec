#!/usr/bin/env python
"""Benchmark system C's prefill speed against the unpruned LLaVA-1.5 at a shape-faithful scaled size.

Not a test. Builds a LLaVA-1.5 (the fork) with the 7B's *proportions* divided by one
factor of 4 in width and in token count: Vicuna's 32 layers and MHA kept, hidden 4096 ->
1024 (8 heads x 128), MLP 11008 -> 2752; CLIP ViT-L/14-336's 24 layers kept, width 1024 -> 256,
576 -> 144 vision tokens (168 px, 14 px patches); 60 -> 15 text tokens; merger and pruner heads
512 -> 128 wide. Scaling widths and token counts by the same factor keeps the ratio of attention
to projection FLOPs, so the analytic FLOP ratio of the scaled shapes equals that of the real
shapes (both are printed, with the measured time ratio). Random seeded weights (speed does not
depend on them), batch of one (``--batch-size``), float32, ``logits_to_keep=1`` as in ``generate``.

Methods, each at the token budgets of ``eval_llava_pruning.py`` (mean fraction of the vision
tokens per LLM layer): ``learned`` (merger 144 -> 72 + pruner heads at layers 10/20/31, untrained
heads: the time depends on the counts, not on which tokens are kept), ``random``, ``fastv`` and
``divprune``. Every method runs in the same process as the unpruned model: warm-up, then
``--repeats`` interleaved rounds, median.

    python scripts/bench_llava.py                       # ~3 min on 2 CPU cores
    python scripts/bench_llava.py --repeats 7 --stats-json docs/bench/bench_llava.json
    python scripts/bench_llava.py --scale 1 --device cuda --budgets 0.35,0.25   # the real 7B shapes, bf16 GPU
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from cli import ArgumentParser, UserError, machine_info, run_cli, write_json

IMAGE_TOKEN_ID = 32000
SCALE = 4  # 576 / 4 = 144 = 12 x 12 patches; the only factor of 576 below 8 that leaves a square grid
PATCHES = {1: 24, 4: 12}  # patch grid side per scale: 24 x 24 = 576 tokens (CLIP ViT-L/14-336), 12 x 12 = 144
DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="0.1,0.25,0.35,0.5", help="token budgets (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per prefill (the same prompt repeated)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--scale", type=int, default=SCALE, choices=sorted(PATCHES),
                   help="divide widths and token counts by this (1: the real LLaVA-1.5-7B shapes, for a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--stats-json", type=Path, default=Path("outputs_bench/bench_llava.json"))
    args = p.parse_args(argv)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        args.budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--budgets must be comma-separated fractions like 0.25,0.5, got {args.budgets!r}") from None
    if not args.budgets or any(not 0.0 < b <= 1.0 for b in args.budgets):
        raise UserError(f"--budgets must be fractions in (0, 1], got {args.budgets}")
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def scaled_model(scale: int, device: str = "cpu", dtype: str = "float32"):
    """The fork at LLaVA-1.5-7B proportions / ``scale`` (random seeded weights, eval mode), built on ``device``.

    ``scale=1`` is the real configuration (CLIP ViT-L/14-336 + Vicuna-7B, 7.06 B parameters).
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from models.llava.modeling_llava import LlavaForConditionalGeneration

    patches = PATCHES[scale]
    vision = CLIPVisionConfig(hidden_size=1024 // scale, intermediate_size=4096 // scale, num_hidden_layers=24,
                              num_attention_heads=max(1, 16 // scale), image_size=patches * 14, patch_size=14,
                              projection_dim=768 // scale)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096 // scale, intermediate_size=11008 // scale,
                       num_hidden_layers=32, num_attention_heads=32 // scale, num_key_value_heads=32 // scale,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a CPU init of 7 B parameters takes minutes
        model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False), patches * patches


class LlavaOracle:
    """What a method's kept token counts cost by themselves, from upstream parts only.

    The CLIP tower on the image, the projector on the rows that enter the LLM (all of them, or the learned merger's
    ``M``), then transformers' own (unforked) ``LlamaModel``, split where the vision-token count changes, each part
    run on random embeddings of exactly the length its layers process (the first rows go on), with its own KV cache,
    and the LM head on the last row: no merger, no pruner head, no selector, no bookkeeping. The upstream layers are
    one copy of the benchmarked model's weights, shared by every split."""

    def __init__(self, model):
        from transformers.models.llama.modeling_llama import LlamaModel as UpstreamLlamaModel

        language_model = model.model.language_model
        self.model, self.config, self.upstream_class = model, language_model.config, UpstreamLlamaModel
        self.full = UpstreamLlamaModel(self.config).to(dtype=language_model.dtype, device=language_model.device).eval()
        self.full.load_state_dict(language_model.state_dict(), strict=True)  # the fork has upstream's layout
        self.parts: dict = {}

    def part(self, first: int, last: int):
        """Upstream ``LlamaModel`` running layers ``first..last - 1`` of the shared copy (final norm only at the end)."""
        import copy

        import torch

        if (first, last) not in self.parts:
            config = copy.deepcopy(self.config)
            config.num_hidden_layers = 0
            with torch.device("meta"):  # every module below is the shared copy's
                part = self.upstream_class(config)
            config.num_hidden_layers = last - first
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = self.config.layer_types[first:last]
            part.embed_tokens, part.rotary_emb = self.full.embed_tokens, self.full.rotary_emb
            part.layers = torch.nn.ModuleList(self.full.layers[first:last])
            part.norm = self.full.norm if last == self.config.num_hidden_layers else torch.nn.Identity()
            self.parts[(first, last)] = part.eval()
        return self.parts[(first, last)]

    def groups(self, layer_tokens: list[int]) -> list[tuple[int, int, int]]:
        """``(first, last, vision tokens)`` of each run of layers with the same vision-token count."""
        out = []
        for layer, tokens in enumerate(layer_tokens):
            if out and out[-1][2] == tokens:
                out[-1] = (out[-1][0], layer + 1, tokens)
            else:
                out.append((layer, layer + 1, tokens))
        return out

    def prefill(self, pixel_values, projected_rows: int, text_len: int, layer_tokens: list[int], generator) -> None:
        """One oracle prefill (timed by the caller)."""
        import torch

        model = self.model
        tower = model.model.vision_tower(pixel_values, output_hidden_states=model.config.vision_feature_layer)
        features = tower.hidden_states[model.config.vision_feature_layer][:, 1:1 + projected_rows]
        model.model.multi_modal_projector(features)
        batch, width = pixel_values.shape[0], self.config.hidden_size
        weight = self.full.layers[0].self_attn.q_proj.weight
        hidden = torch.randn(batch, text_len + layer_tokens[0], width, generator=generator).to(weight.device, weight.dtype)
        model.lm_head(self.language_model(hidden, text_len, layer_tokens)[:, -1:])

    def language_model(self, inputs_embeds, text_len: int, layer_tokens: list[int]):
        """``[B, text_len + layer_tokens[0], D]`` -> ``[B, text_len + layer_tokens[-1], D]`` last hidden state: each
        group of layers on the first ``text_len + tokens`` rows of what the one before returned."""
        import torch
        from transformers import DynamicCache

        hidden = inputs_embeds
        for first, last, tokens in self.groups(layer_tokens):
            hidden = hidden[:, : text_len + tokens]
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            hidden = self.part(first, last)(inputs_embeds=hidden, position_ids=positions, past_key_values=DynamicCache(),
                                            use_cache=True).last_hidden_state
        return hidden


def pruning_heads_prefill(pruning, batch: int, num_vision: int, text_len: int, layer_tokens: list[int], device,
                          dtype, generator) -> None:
    """The learned stages' own work alone on inputs of the right shapes (timed by the caller): the merger on the
    ``N`` CLIP features, then each pruner head on the vision tokens entering its layer and the question rows."""
    import torch

    merger = pruning.merger
    features = torch.randn(batch, num_vision, merger.norm.normalized_shape[0], generator=generator).to(device, dtype)
    merger(features, temperature=pruning.temperature)
    text_dim = next(iter(pruning.pruners.values())).vision_norm.normalized_shape[0]
    question = torch.randn(batch, text_len, text_dim, generator=generator).to(device, dtype)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    for layer in pruning.pruning_layers:
        vision = torch.randn(batch, layer_tokens[max(0, layer - 1)], text_dim, generator=generator).to(device, dtype)
        pruning.pruners[str(layer)](vision, question, mask, alive=torch.ones(vision.shape[:2], dtype=torch.bool,
                                                                              device=device))


def main() -> int:
    args = parse_args()
    import torch

    from evaluation.flops import LlavaShape, prefill_flops
    from pruning.llava.baselines import baseline_schedule, learned_schedule, schedule_selectors
    from pruning.llava.config import VisionTokenPruningConfig, config_from_dict
    from pruning.llava.runtime import attach_pruning, detach_pruning

    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale
    model, num_vision = scaled_model(scale, args.device, args.dtype)
    text_len = 60 // scale
    real = LlavaShape()
    shape = LlavaShape(hidden=4096 // scale, mlp=11008 // scale, kv_hidden=4096 // scale, num_vision=num_vision,
                       text_len=text_len, vision_dim=1024 // scale, merger_internal=512 // scale,
                       pruner_internal=512 // scale)
    base_cfg = VisionTokenPruningConfig()
    flat = {k: v for section in base_cfg.to_dict().values() for k, v in section.items()}
    flat.update(merger_d_internal=512 // scale, pruner_d_internal=512 // scale)
    cfg = config_from_dict(flat, source="bench_llava")
    layers, ratios = list(cfg.pruner.pruning_layers), list(cfg.pruner.keep_ratios)
    merged = cfg.merger.resolve_num_tokens(num_vision)
    real_merged = cfg.merger.resolve_num_tokens(real.num_vision)

    g = torch.Generator().manual_seed(0)
    before = text_len // 3  # "<s> USER: " before the image, the question and "ASSISTANT:" after it
    ids = torch.cat([torch.tensor([1]), torch.randint(2, 32000, (before - 1,), generator=g),
                     torch.full((num_vision,), IMAGE_TOKEN_ID),
                     torch.randint(2, 32000, (text_len - before,), generator=g)]).unsqueeze(0)
    pixels = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size, generator=g)
    ids, pixels = ids.repeat(args.batch_size, 1), pixels.repeat(args.batch_size, 1, 1, 1)
    inputs = {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device),
              "pixel_values": pixels.to(args.device, getattr(torch, args.dtype))}
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    runs = [{"method": "unpruned", "budget": 1.0, "attach": lambda: None, "projected_rows": num_vision,
             "flops": (prefill_flops(shape, [num_vision] * 32), prefill_flops(real, [real.num_vision] * 32)),
             "tokens": [num_vision] * 32}]

    def learned(budget):
        sched = learned_schedule(budget, 32, num_vision, merged, layers, ratios)
        real_sched = learned_schedule(budget, 32, real.num_vision, real_merged, layers, ratios)

        def attach():
            pruning = attach_pruning(model, cfg)
            pruning.keep_ratios = dict(zip(pruning.pruning_layers, sched.keep_ratios))
            pruning.merger.target_merge_tokens = sched.merged
            pruning.eval()

        def flops(sh, sched_):
            return prefill_flops(sh, sched_.layer_tokens, merged=sched_.merged, pruner_layers=layers,
                                 pruner_vision=[sched_.layer_tokens[max(0, l - 1)] for l in layers])
        return {"method": "learned", "budget": budget, "attach": attach, "tokens": list(sched.layer_tokens),
                "projected_rows": sched.merged, "keep_ratios": sched.keep_ratios,
                "flops": (flops(shape, sched), flops(real, real_sched))}

    def baseline(method, budget):
        sched = baseline_schedule(method, budget, 32, num_vision)
        real_sched = baseline_schedule(method, budget, 32, real.num_vision)
        return {"method": method, "budget": budget, "tokens": list(sched.layer_tokens), "projected_rows": num_vision,
                "attach": lambda: attach_pruning(model, use_merger=False, use_pruners=False,
                                                 selectors=schedule_selectors(sched)).eval(),
                "flops": (prefill_flops(shape, sched.layer_tokens), prefill_flops(real, real_sched.layer_tokens))}

    runs.append(learned(None))
    for budget in args.budgets:
        runs += [learned(budget)] + [baseline(m, budget) for m in ("random", "fastv", "divprune", "visionzip")]

    @torch.no_grad()
    def timed(run) -> float:
        run["attach"]()
        synchronize()
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        synchronize()
        seconds = time.perf_counter() - start
        detach_pruning(model)
        return seconds

    oracle = LlavaOracle(model)
    heads = attach_pruning(model, cfg).eval()  # the learned stages' modules, timed alone (untrained: same cost)
    detach_pruning(model)

    @torch.no_grad()
    def timed_oracle(run) -> float:
        synchronize()
        start = time.perf_counter()
        oracle.prefill(inputs["pixel_values"], run["projected_rows"], text_len, run["tokens"], g)
        synchronize()
        return time.perf_counter() - start

    @torch.no_grad()
    def timed_heads(run) -> float:
        if run["method"] != "learned":
            return 0.0
        heads.keep_ratios = dict(zip(heads.pruning_layers, run["keep_ratios"]))
        synchronize()
        start = time.perf_counter()
        pruning_heads_prefill(heads, args.batch_size, num_vision, text_len - before, run["tokens"], args.device,
                              getattr(torch, args.dtype), g)
        synchronize()
        return time.perf_counter() - start

    from tqdm.auto import tqdm

    measures = {"prefill": timed, "oracle": timed_oracle, "heads": timed_heads}
    for run in runs:  # warm-up
        for measure in measures.values():
            measure(run)
    samples = {i: {name: [] for name in measures} for i in range(len(runs))}
    for _ in tqdm(range(args.repeats), desc="interleaved rounds (every method, its oracle and heads once)"):
        for i, run in enumerate(runs):
            for name, measure in measures.items():
                samples[i][name].append(measure(run))
    times = {i: samples[i]["prefill"] for i in samples}
    base_time = statistics.median(times[0])
    results = []
    for i, run in enumerate(runs):
        t = statistics.median(times[i])
        scaled_flops, real_flops = run["flops"]
        oracle_s, heads_s = statistics.median(samples[i]["oracle"]), statistics.median(samples[i]["heads"])
        results.append({
            "method": run["method"], "budget": run["budget"],
            "oracle_prefill_seconds_median": oracle_s, "heads_seconds_median": heads_s,
            "prefill_over_oracle_plus_heads": t / (oracle_s + heads_s),
            "achieved_budget": sum(run["tokens"]) / (32 * num_vision),
            "vision_tokens_per_layer": run["tokens"],
            "prefill_seconds_median": t, "prefill_seconds_all": times[i],
            "speedup": base_time / t,
            "flops_ratio_scaled": scaled_flops["total"] / runs[0]["flops"][0]["total"],
            "flops_ratio_real": real_flops["total"] / runs[0]["flops"][1]["total"],
            "flops_scaled": scaled_flops, "flops_real": real_flops,
        })
    report = {
        "what": f"prefill (vision tower + merger + projector + LLM, logits_to_keep=1) of {args.batch_size} prompt(s), median of "
                f"{args.repeats} interleaved rounds after a warm-up",
        "scale": scale, "shape": {"llm_layers": 32, "hidden": shape.hidden, "mlp": shape.mlp,
                                  "vision_tokens": num_vision, "text_tokens": text_len,
                                  "clip_width": shape.vision_dim, "clip_layers": 24},
        "machine": machine_info(torch, torch.device(args.device)), "dtype": args.dtype, "batch_size": args.batch_size,
        "results": results,
    }
    write_json(args.stats_json, report)
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} CPU threads")
    print(f"LLaVA-1.5-7B proportions / {scale}: {num_vision} vision + {text_len} text tokens, hidden {shape.hidden}, "
          f"32 layers, batch {args.batch_size}, {args.dtype} on {where}; unpruned prefill {base_time * 1e3:.1f} ms")
    print(f"{'method':<10}{'budget':>8}{'achieved':>10}{'speedup':>9}{'FLOPs ratio (scaled)':>22}{'(real 7B)':>11}"
          f"{'oracle':>9}{'heads':>8}{'/(oracle+heads)':>17}")
    for r in results:
        budget = "trained" if r["budget"] is None else f"{r['budget']:.2f}"
        print(f"{r['method']:<10}{budget:>8}{r['achieved_budget']:>10.3f}{r['speedup']:>8.2f}x"
              f"{r['flops_ratio_scaled']:>22.3f}{r['flops_ratio_real']:>11.3f}"
              f"{r['oracle_prefill_seconds_median'] * 1e3:>7.1f}ms{r['heads_seconds_median'] * 1e3:>6.1f}ms"
              f"{r['prefill_over_oracle_plus_heads']:>17.2f}")
    print(f"wrote {args.stats_json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
