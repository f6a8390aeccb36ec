#!/usr/bin/env python
"""Reference-token reuse on the trained edit testbed, against the baseline, the ground truth and the alternatives.

Every edit of the first ``--num-edits`` held-out test edits (``data/edit_task.py``) is run by every method from the
same seed, on the shipped testbed (``models/trained/qwenimage_edit``: 4 Lightning steps, 128x128 output, reference
encoded at 128x128), once with its transformer and once with the ``zero_cond_t`` (Qwen-Image-Edit-2511)
transformer shipped beside it:

* ``baseline`` (4 steps) and ``identity`` (the input returned unchanged);
* reference reuse: ``{mlp,full,kv}_{alternate,once,reuse2,reuse4}`` (refresh steps 1,3 / 1 / 1,3,4 / 1,2,3: reuse
  on steps 2 and 4, on 2-4, on step 2 only, on step 4 only);
* fewer steps: ``steps_3``, ``steps_2``;
* diffusers' own caches on the fork: ``first_block_cache``, ``taylorseer_cache``, ``mag_cache`` (MagCache calibrated
  on a validation edit first; ``pruning/edit/step_caches.py`` says how each is set for 4 steps);
* a smaller reference: ``reference_quarter`` (``reference_area`` a quarter: a quarter of the reference tokens), and
  ``kv_once_reference_quarter`` (both).

Per method: PSNR / SSIM against the baseline's output and against the target (mean and standard error), recolour
accuracy (the edited shape's median colour is the asked one), ``flops_ratio_real`` (the transformer's FLOPs over
the edit at the real Qwen-Image-Edit shape, 1024x1024 output and reference: analytic for reuse, fewer steps and a
smaller reference; for the caches, the attention / MLP calls they actually made, each at its real-shape cost), and
``speedup_measured`` (the baseline's transformer time over the method's, in this process, at the toy size: CPU
overheads dominate it; ``scripts/bench_edit.py`` measures speed at a shape-faithful size). Writes the stats JSON
(``--stats-json``) and ``quality_vs_speed.png`` (PSNR against the target over the real-shape FLOP speedup) into
``--output-dir``.

    python scripts/eval_edit.py                              # make eval-edit: 100 test edits, both transformers
    python scripts/eval_edit.py --num-edits 20 --methods baseline,kv_once,steps_2 --no-zero-cond-t
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cli import ArgumentParser, UserError, check_output_dir, check_output_file, run_cli, set_torch_threads, write_outputs

SCHEDULES = {"alternate": "1,3", "once": "1", "reuse2": "1,3,4", "reuse4": "1,2,3"}
CACHES = ("first_block_cache", "taylorseer_cache", "mag_cache")


def method_specs() -> dict[str, dict]:
    """name -> what the method changes in the edit call (``cache``: a diffusers cache attached around it)."""
    from models.tiny.edit_testbed import REFERENCE_AREA

    specs: dict[str, dict] = {"baseline": {}, "identity": {}}
    for mode in ("mlp", "full", "kv"):
        for schedule, refresh in SCHEDULES.items():
            specs[f"{mode}_{schedule}"] = {"pruning_mode": mode, "refresh_steps": refresh}
    specs["steps_3"] = {"num_inference_steps": 3}
    specs["steps_2"] = {"num_inference_steps": 2}
    for cache in CACHES:
        specs[cache] = {"cache": cache}
    specs["reference_quarter"] = {"reference_area": REFERENCE_AREA // 4}
    specs["kv_once_reference_quarter"] = {"pruning_mode": "kv", "refresh_steps": "1", "reference_area": REFERENCE_AREA // 4}
    return specs


def parse_args(argv=None):
    from models.tiny.edit_testbed import SHIPPED_DIR

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=SHIPPED_DIR, help=f"a trained testbed directory (default {SHIPPED_DIR})")
    p.add_argument("--num-edits", type=int, default=100, help="held-out test edits (the first N of the split)")
    p.add_argument("--seed", type=int, default=0, help="the task's seed (which edits)")
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    p.add_argument("--no-zero-cond-t", action="store_true", help="skip the zero_cond_t (Edit-2511) transformer")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("outputs_edit_eval"))
    p.add_argument("--stats-json", type=Path, default=None, help="default: <output-dir>/eval_edit.json")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    return p.parse_args(argv)


def validate(args) -> list[str]:
    specs = method_specs()
    methods = list(specs) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in specs]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {unknown} in --methods; choose from {', '.join(specs)} or 'all'")
    methods = ["baseline"] + [m for m in dict.fromkeys(methods) if m != "baseline"]  # every comparison is against it
    if args.num_edits < 2:
        raise UserError(f"--num-edits must be >= 2 (standard errors), got {args.num_edits}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if not (args.model_path / "model_index.json").is_file():
        raise UserError(f"--model-path {str(args.model_path)!r} holds no trained testbed (model_index.json): "
                        "pass the directory make train-edit-base writes")
    from models.tiny.edit_testbed import ZERO_COND_T_SUBFOLDER

    if not args.no_zero_cond_t and not (args.model_path / ZERO_COND_T_SUBFOLDER / "config.json").is_file():
        raise UserError(f"--model-path {str(args.model_path)!r} has no {ZERO_COND_T_SUBFOLDER}/: pass --no-zero-cond-t")
    check_output_dir(args.output_dir, "-o/--output-dir")
    check_output_file(args.stats_json, "--stats-json")
    return methods


def real_shape(reference_area: int):
    """The real Qwen-Image-Edit call at 1024x1024 output with the reference at ``reference_area`` (scaled from the
    testbed's 128x128): the reference tokens, and the prompt's vision tokens (Qwen2.5-VL: one per 28x28 px) + 50."""
    from evaluation.flops import QwenImageShape
    from models.tiny.edit_testbed import REFERENCE_AREA

    area = 1024 * 1024 * reference_area // REFERENCE_AREA
    return QwenImageShape(reference_len=area // 256, text_len=round(area / 28**2) + 50)


def analytic_flops_ratio(spec: dict, num_steps: int) -> float | None:
    """Real-shape transformer FLOPs of the method over the baseline's (None: counted at run time)."""
    from evaluation.flops import qwenimage_call_flops, qwenimage_edit_flops_ratio
    from models.tiny.edit_testbed import REFERENCE_AREA
    from pruning.edit.reference_reuse import resolve_refresh_steps

    if "cache" in spec:
        return None
    full = real_shape(REFERENCE_AREA)
    shape = real_shape(spec.get("reference_area", REFERENCE_AREA))
    steps = spec.get("num_inference_steps", num_steps)
    size = qwenimage_call_flops(shape, "none", False) / qwenimage_call_flops(full, "none", False)
    mode = spec.get("pruning_mode", "none")
    if mode == "none":
        return size * steps / num_steps
    refresh = resolve_refresh_steps(spec["refresh_steps"], steps)
    return size * qwenimage_edit_flops_ratio(shape, mode, refresh, steps) * steps / num_steps


def evaluate_variant(pipe, samples, methods, specs, mag_ratios, progress) -> dict:
    """Every method on every sample: per-item scores and the aggregates (``{"methods": {...}}``)."""
    from cli import ModuleTimer
    from evaluation.flops import qwenimage_counted_flops_ratio
    from evaluation.metrics import psnr, ssim
    from models.tiny.edit_testbed import NUM_STEPS, REFERENCE_AREA, edit_scores, run_edit, summarise
    from pruning.edit.step_caches import WorkCounter, cache_config, step_cache

    timer = ModuleTimer(pipe.transformer)
    counter = WorkCounter(pipe.transformer)
    baseline_images, baseline_counts, results = [], None, {}
    try:
        for name in methods:
            spec = specs[name]
            items, seconds = [], 0.0
            counter.reset()
            for index, sample in enumerate(samples):
                if name == "identity":
                    image = sample.source_image()
                else:
                    call = {k: v for k, v in spec.items() if k != "cache"}
                    timer.reset()
                    if "cache" in spec:
                        with step_cache(pipe.transformer, cache_config(spec["cache"], NUM_STEPS, mag_ratios)):
                            image = run_edit(pipe, sample, seed=index, **call)
                    else:
                        image = run_edit(pipe, sample, seed=index, **call)
                    seconds += timer.seconds
                if name == "baseline":
                    baseline_images.append(image)
                scores = edit_scores(sample, image)
                items.append({"psnr_vs_target": scores["psnr"], "ssim_vs_target": scores["ssim"],
                              "colour_right": scores["colour_right"],
                              "psnr_vs_baseline": psnr(image, baseline_images[index]),
                              "ssim_vs_baseline": ssim(image, baseline_images[index])})
                progress.update(1)
            counts = dict(counter.counts)
            if name == "baseline":
                baseline_counts, baseline_seconds = counts, seconds
            flops = 0.0 if name == "identity" else analytic_flops_ratio(spec, NUM_STEPS)
            if flops is None:
                flops = qwenimage_counted_flops_ratio(real_shape(REFERENCE_AREA), counts, baseline_counts)
            finite = lambda key: [i[key] for i in items if math.isfinite(i[key])]  # noqa: E731 - identical images: inf
            result = {key: summarise(finite(key)) if finite(key) else None
                      for key in ("psnr_vs_baseline", "ssim_vs_baseline", "psnr_vs_target", "ssim_vs_target")}
            result["identical_to_baseline"] = sum(not math.isfinite(i["psnr_vs_baseline"]) for i in items)
            colour = [float(i["colour_right"]) for i in items if i["colour_right"] is not None]
            result["recolour_accuracy"] = summarise(colour) if colour else None
            result["flops_ratio_real"] = round(flops, 4)
            result["speedup_measured"] = round(baseline_seconds / seconds, 3) if name != "identity" and seconds else None
            result["transformer_seconds"] = round(seconds, 3)
            result["work_counts"] = counts
            result["per_type_psnr_vs_target"] = {}
            for edit_type in sorted({s.edit_type for s in samples}):
                chosen = [i["psnr_vs_target"] for s, i in zip(samples, items) if s.edit_type == edit_type]
                result["per_type_psnr_vs_target"][edit_type] = summarise(chosen)
            results[name] = result
    finally:
        timer.remove()
        counter.remove()
    return {"methods": results}


def table(results: dict) -> str:
    def cell(value, digits):
        return "—" if value is None else f"{value['mean']:.{digits}f} ± {value['se']:.{digits}f}"

    lines = [f"{'method':<28} {'PSNR vs base':>16} {'SSIM vs base':>17} {'PSNR vs target':>16} {'SSIM vs target':>17} "
             f"{'recolour':>12} {'FLOPs real':>10} {'speedup':>8}"]
    for name, r in results.items():
        same = f" ({r['identical_to_baseline']} = base)" if r["identical_to_baseline"] else ""
        lines.append(f"{name:<28} {cell(r['psnr_vs_baseline'], 2):>16} {cell(r['ssim_vs_baseline'], 4):>17} "
                     f"{cell(r['psnr_vs_target'], 2):>16} {cell(r['ssim_vs_target'], 4):>17} "
                     f"{cell(r['recolour_accuracy'], 2):>12} {r['flops_ratio_real']:>10.3f} "
                     f"{'—' if r['speedup_measured'] is None else format(r['speedup_measured'], '.2f') + 'x':>8}{same}")
    return "\n".join(lines)


FAMILIES = ("baseline", "reference reuse (kv)", "reference reuse (full / mlp)", "fewer steps", "diffusers caches",
            "smaller reference")


def family(name: str) -> int:
    """The plot's series of a method (an index into FAMILIES)."""
    if name == "baseline":
        return 0
    if "reference_quarter" in name:
        return 5
    if name.startswith("kv_"):
        return 1
    if name.startswith(("full_", "mlp_")):
        return 2
    if name.startswith("steps_"):
        return 3
    return 4


def plot(report: dict):
    from evaluation.plot import Point, scatter_plot

    points = []
    for marker, results in enumerate(report["variants"].values()):
        for name, r in results["methods"].items():
            if name == "identity" or r["flops_ratio_real"] <= 0:
                continue
            points.append(Point(1 / r["flops_ratio_real"], r["psnr_vs_target"]["mean"],
                                f"{name}  ({1 / r['flops_ratio_real']:.2f}x)", family(name),
                                r["psnr_vs_target"]["se"], marker))
    identity = next(iter(report["variants"].values()))["methods"].get("identity")
    title = "PSNR against the target edit vs real-shape FLOP speedup (mean \u00b1 s.e.)"
    if identity:
        title += f"; returning the input unchanged: {identity['psnr_vs_target']['mean']:.2f} dB"
    return scatter_plot(points, x_label="FLOP speedup at the real shape (1 / flops_ratio_real)",
                        y_label="PSNR vs target (dB)", title=title, series=FAMILIES,
                        markers=[f"{variant} transformer" for variant in report["variants"]])


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = validate(args)
    set_torch_threads(args.threads)
    import json

    import torch
    from tqdm.auto import tqdm

    from cli import machine_info
    from data.edit_task import make_edit, make_split
    from models.tiny.edit_testbed import NUM_STEPS, run_edit, shipped_pipeline
    from pruning.edit.step_caches import calibrate_mag_ratios

    specs = method_specs()
    samples = make_split("test", args.num_edits, seed=args.seed)
    variants = {"default": False} if args.no_zero_cond_t else {"default": False, "zero_cond_t": True}
    report = {"settings": {"num_edits": args.num_edits, "seed": args.seed, "split": "test", "steps": NUM_STEPS,
                           "model_path": str(args.model_path), "methods": methods},
              "machine": machine_info(torch, torch.device("cpu")), "variants": {}}
    begin = time.perf_counter()
    with tqdm(total=len(variants) * len(methods) * len(samples), desc="edits", unit="edit", dynamic_ncols=True) as bar:
        for variant, zero_cond_t in variants.items():
            pipe = shipped_pipeline(zero_cond_t=zero_cond_t, path=args.model_path)
            mag_ratios = None
            if "mag_cache" in methods:
                calibration = make_edit(args.seed, "val", 0)
                mag_ratios = calibrate_mag_ratios(lambda: run_edit(pipe, calibration), pipe.transformer, NUM_STEPS)
            with torch.no_grad():
                report["variants"][variant] = evaluate_variant(pipe, samples, methods, specs, mag_ratios, bar)
            report["variants"][variant]["mag_ratios"] = mag_ratios
    report["seconds"] = round(time.perf_counter() - begin, 1)
    # the file's top level: the default transformer's methods; the zero_cond_t transformer's under "zero_cond_t"
    stats = {"methods": report["variants"]["default"]["methods"], **report}
    if "zero_cond_t" in report["variants"]:
        stats["zero_cond_t"] = report["variants"]["zero_cond_t"]
    stats_path = args.stats_json or args.output_dir / "eval_edit.json"
    picture = plot(report)
    write_outputs({stats_path: lambda tmp: tmp.write_text(json.dumps(stats, indent=2, default=str) + "\n"),
                   args.output_dir / "quality_vs_speed.png": lambda tmp: picture.save(tmp, format="PNG")})
    for variant, results in report["variants"].items():
        print(f"\n{variant} transformer ({args.num_edits} test edits, {NUM_STEPS} steps):")
        print(table(results["methods"]))
    print(f"\nstats in {stats_path}, plot in {args.output_dir / 'quality_vs_speed.png'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
