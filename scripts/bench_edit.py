#!/usr/bin/env python
"""Benchmark reference-token reuse: transformer time of a whole N-step edit, per mode and schedule.

Not a test. Builds the forked Qwen-Image transformer at the real model's *proportions*
(D = 3072 = 24 heads x 128, 60 blocks, L_denoise = L_image = 4096 at 1024x1024, ~200 text
tokens for Edit-2509/2511 or ~1.4k for the original Edit), with width (number of heads; the
head stays 128 wide), token counts and depth divided by one ``--scale`` factor so that it runs on 2 CPU cores, random weights. Every mode
runs in the same process against ``none`` (warm-up, then the median of ``--repeats``), and
the measured speedup is printed next to the analytic FLOP bound of the same (scaled) shapes
and of the real shapes.

    python scripts/bench_edit.py                      # Edit-2509/2511 proportions, scale 8
    python scripts/bench_edit.py --text-len 1400      # the original Edit prompt template
    python scripts/bench_edit.py --references 1 2 3   # Edit-2509/2511 with one, two and three reference images

With several reference images (the Plus pipeline) every reference is a 1024x1024 image (L_image tokens), all
concatenated after the noisy latents, and all of them are reference tokens.

The FLOP bound counts the matrix products whose size grows with the tokens. A step also has a cost that does
not: the modulation and time-embedding products (one row each, bound by reading their weights), the text stream
(25 tokens at scale 8, where products run at a third to half of their speed on 2 cores) and per-operation overhead. The
script measures it (``fixed step``: one call whose image stream is two tokens) and prints a second bound that
charges it to every step, next to the FLOP bound: ``bound_with_fixed_cost``.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from pathlib import Path

from cli import ArgumentParser, UserError, check_output_file, run_cli, write_json

SCHEDULES = {"alternate": "alternate", "once": "once"}


def bound_with_fixed_cost(baseline_s: float, fixed_step_s: float, steps: int, flops_ratio: float) -> float:
    """Speedup expected when every step costs ``fixed_step_s`` plus a time proportional to its FLOPs.

    The baseline edit takes ``baseline_s`` over ``steps`` steps; of it, ``steps * fixed_step_s`` is fixed and the
    rest shrinks to ``flops_ratio`` (the mode's FLOPs over the baseline's). ``fixed_step_s = 0``: the FLOP bound.
    """
    fixed_s = steps * fixed_step_s
    if not 0 <= fixed_s < baseline_s:
        raise ValueError(f"the fixed cost {fixed_s:.4f} s must lie in [0, {baseline_s:.4f}) s, the baseline edit's time")
    return baseline_s / (fixed_s + (baseline_s - fixed_s) * flops_ratio)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, default=8, help="divide width, token counts and depth by this factor")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--text-len", type=int, default=200, help="real-model text tokens (200: Edit-2509/2511, 1400: Edit)")
    p.add_argument("--references", type=int, nargs="+", default=[1],
                   help="numbers of reference images to time (Edit-2509/2511 take several), e.g. 1 2 3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="mlp,full,kv")
    p.add_argument("--schedules", default="alternate,once")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--stats-json", type=Path, default=Path("outputs_bench/bench_edit.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scale < 1 or 24 % args.scale or 4096 % args.scale:
        raise UserError(f"--scale must divide 24 heads and 4096 tokens (1, 2, 4, 8), got {args.scale}")
    if args.steps < 1 or args.repeats < 1:
        raise UserError("--steps and --repeats must be >= 1")
    if any(n < 1 for n in args.references):
        raise UserError(f"--references must be >= 1, got {args.references}")
    if args.text_len < 1:
        raise UserError(f"--text-len must be >= 1, got {args.text_len}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("mlp", "full", "kv"):
            raise UserError(f"unknown mode {m!r} in --modes; choose from mlp, full, kv")
    check_output_file(args.stats_json, "--stats-json")

    import torch
    from tqdm import tqdm

    from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel
    from evaluation.flops import QwenImageShape, qwenimage_edit_flops_ratio
    from pruning.edit.reference_reuse import reference_reuse, resolve_refresh_steps

    for sch in args.schedules.split(","):  # before the model is built
        if sch:
            try:
                resolve_refresh_steps(sch, args.steps)
            except ValueError as error:
                raise UserError(f"--schedules: {error}") from None

    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.scale
    heads, head_dim = 24 // s, 128  # the real head width; fewer heads
    h, w = 64, 64 // s  # the 64 x 64 token grid of a 1024x1024 image, one side divided by s
    l_img = h * w
    blocks = max(1, round(60 / s))
    text_len = max(1, round(args.text_len / s))
    axes = (16, 56, 56)  # the real RoPE split of the 128-wide head
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=blocks, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=3584 // s, axes_dims_rope=axes,
    ).eval()
    dim = heads * head_dim
    text = torch.randn(1, text_len, 3584 // s)
    # The Edit and Edit-Plus pipelines drop an all-ones prompt mask (``if prompt_embeds_mask.all(): ... = None``), so
    # a single prompt reaches the transformer without one and attention runs unmasked: time that.
    mask = None

    @torch.no_grad()
    def edit(mode: str, schedule: str | None, num_references: int) -> float:
        """Transformer time (s) of one whole edit: ``args.steps`` calls, fresh noisy latents each step."""
        generator = torch.Generator().manual_seed(1)
        reference = torch.randn(1, num_references * l_img, 64, generator=torch.Generator().manual_seed(2))
        img_shapes = [[(1, h, w)] + [(1, h, w)] * num_references]
        total = 0.0
        with contextlib.ExitStack() as stack:
            if mode != "none":
                stack.enter_context(reference_reuse(model, mode, args.steps, schedule))
            for step in range(args.steps):
                noisy = torch.randn(1, l_img, 64, generator=generator)
                kwargs = dict(
                    hidden_states=torch.cat([noisy, reference], dim=1), encoder_hidden_states=text,
                    encoder_hidden_states_mask=mask, timestep=torch.tensor([1.0 - step / args.steps]),
                    img_shapes=img_shapes, return_dict=False,
                )
                start = time.perf_counter()
                with model.cache_context("cond"):  # as the pipelines call it: the branch the reuse state keys on
                    model(**kwargs)
                total += time.perf_counter() - start
        return total

    @torch.no_grad()
    def fixed_step() -> float:
        """Transformer time (s) of one call whose image stream is two tokens: the per-step cost that does not grow
        with the image tokens (modulation, time embedding, the text stream, per-operation overhead)."""
        kwargs = dict(hidden_states=torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(3)),
                      encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5]),
                      img_shapes=[[(1, 1, 2)]], return_dict=False)
        start = time.perf_counter()
        model(**kwargs)
        return time.perf_counter() - start

    configs = [(mode, sch, n) for n in args.references
               for mode, sch in [("none", None)] + [(m, sch) for sch in args.schedules.split(",") if sch for m in modes]]
    times: dict[tuple[str, str | None, int], list[float]] = {c: [] for c in configs}
    fixed_step_times: list[float] = []
    for c in tqdm(configs, desc="warm-up (references x mode x schedule)"):
        edit(*c)
    fixed_step()
    for _ in tqdm(range(args.repeats), desc="timed repeats (all configurations)"):
        for c in configs:  # interleaved, so drift in machine speed hits every mode alike
            times[c].append(edit(*c))
        fixed_step_times.extend(fixed_step() for _ in range(3))
    fixed_step_s = statistics.median(fixed_step_times)

    shapes = {n: dict(scaled=QwenImageShape(num_blocks=blocks, dim=dim, denoise_len=l_img, reference_len=n * l_img,
                                            text_len=text_len),
                      real=QwenImageShape(reference_len=n * QwenImageShape.reference_len, text_len=args.text_len))
              for n in args.references}
    rows = []
    for mode, sch, n in configs:
        scaled, real = shapes[n]["scaled"], shapes[n]["real"]
        baseline = statistics.median(times[("none", None, n)])
        median = statistics.median(times[(mode, sch, n)])
        refresh = resolve_refresh_steps(sch, args.steps) if sch else tuple(range(1, args.steps + 1))
        bound_scaled = 1 / qwenimage_edit_flops_ratio(scaled, mode, refresh, args.steps)
        bound_real = 1 / qwenimage_edit_flops_ratio(real, mode, refresh, args.steps)
        bound_fixed = bound_with_fixed_cost(baseline, fixed_step_s, args.steps, 1 / bound_scaled)
        speedup = baseline / median
        rows.append(dict(references=n, mode=mode, schedule=sch or "-", refresh_steps=list(refresh), median_s=median,
                         speedup=speedup, flops_bound_scaled=bound_scaled, flops_bound_real=bound_real,
                         fraction_of_bound=speedup / bound_scaled, bound_with_fixed_cost=bound_fixed,
                         fraction_of_bound_with_fixed_cost=speedup / bound_fixed, times_s=times[(mode, sch, n)]))

    header = (f"{'refs':>4} {'mode':<5} {'schedule':<10} {'refresh':<8} {'time s':>7} {'speedup':>8} "
              f"{'bound(scaled)':>14} {'bound(real)':>12} {'of bound':>9} {'bound(+fixed)':>14} {'of that':>8}")
    print(f"\nscale 1/{s}: D={dim} ({heads}x{head_dim}), blocks={blocks}, L_denoise=L_image={l_img} per image, "
          f"text={text_len}, steps={args.steps}, torch threads={torch.get_num_threads()}")
    print(f"fixed step (image stream of two tokens): {fixed_step_s * 1e3:.1f} ms; bound(+fixed) charges it to every "
          "step and scales the rest by the FLOP ratio")
    print(header)
    for r in rows:
        print(f"{r['references']:>4} {r['mode']:<5} {r['schedule']:<10} {','.join(map(str, r['refresh_steps'])):<8} "
              f"{r['median_s']:>7.3f} {r['speedup']:>7.2f}x {r['flops_bound_scaled']:>13.2f}x "
              f"{r['flops_bound_real']:>11.2f}x {r['fraction_of_bound']:>8.0%} {r['bound_with_fixed_cost']:>13.2f}x "
              f"{r['fraction_of_bound_with_fixed_cost']:>7.0%}")
    write_json(args.stats_json, dict(
        command="python scripts/bench_edit.py " + " ".join(argv or []),
        machine=dict(platform=platform.platform(), processor=platform.processor(), torch=torch.__version__,
                     threads=torch.get_num_threads()),
        shapes_per_references={n: {k: vars(v) for k, v in pair.items()} for n, pair in shapes.items()}, steps=args.steps, repeats=args.repeats,
        fixed_step_s=fixed_step_s, fixed_step_times_s=fixed_step_times, rows=rows,
    ))
    print(f"stats in {args.stats_json}")
    return 0


if __name__ == "__main__":
    import sys

    run_cli(lambda: main(sys.argv[1:]))
