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

Each edit's scores (every method, one transformer) are appended to ``--records`` (JSON lines) as they finish;
``--resume`` skips the edits recorded for the same testbed, edits and methods. Under ``accelerate launch
--num_processes N`` (on a machine without GPUs: ``accelerate launch --multi_gpu --num_processes N``) the edits are
split between the processes and their records gathered in edit order; the quality and FLOP columns are the
one-process ones, the measured speedup is left out (the report says so).

    python scripts/eval_edit.py                              # make eval-edit: 100 test edits, both transformers
    python scripts/eval_edit.py --num-edits 20 --methods baseline,kv_once,steps_2 --no-zero-cond-t
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cli import ArgumentParser, UserError, check_output_dir, check_output_file, run_cli, set_torch_threads, write_outputs
from evaluation.records import add_records_arguments

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
    add_records_arguments(p, each="one JSON line per edit and transformer as it finishes",
                          default="<output-dir>/eval_edit.records.jsonl", same="testbed, edits and methods")
    args = p.parse_args(argv)
    if args.records is None:
        args.records = args.output_dir / "eval_edit.records.jsonl"
    return args


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
    check_output_file(args.records, "--records")
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


def edit_item(pipe, sample, index: int, methods, specs, mag_ratios, timer, counter) -> dict:
    """Every method on one edit: ``{method: {scores against the target and the baseline, transformer seconds, work
    counts}}`` (JSON-able; infinite PSNR, identical images, as the string "inf")."""
    from evaluation.metrics import psnr, ssim
    from models.tiny.edit_testbed import NUM_STEPS, edit_scores, run_edit
    from pruning.edit.step_caches import cache_config, step_cache

    record, baseline_image = {}, None
    for name in methods:  # the baseline first (validate puts it there): the others are compared with it
        spec = specs[name]
        counter.reset()
        seconds = 0.0
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
            seconds = timer.seconds
        if name == "baseline":
            baseline_image = image
        scores = edit_scores(sample, image)
        record[name] = {"psnr_vs_target": scores["psnr"], "ssim_vs_target": scores["ssim"],
                        "colour_right": scores["colour_right"], "psnr_vs_baseline": psnr(image, baseline_image),
                        "ssim_vs_baseline": ssim(image, baseline_image), "seconds": seconds,
                        "work_counts": dict(counter.counts)}
    return record


def aggregate(samples, methods, specs, items: list[dict], timed: bool) -> dict:
    """The per-method aggregates (``{"methods": {...}}``) of every edit's record (``items``, in edit order).
    ``timed=False`` (records made by several processes at once): no measured speedup or seconds."""
    from evaluation.flops import qwenimage_counted_flops_ratio
    from models.tiny.edit_testbed import NUM_STEPS, REFERENCE_AREA, summarise

    def total_counts(name):
        return {key: sum(item[name]["work_counts"][key] for item in items) for key in items[0][name]["work_counts"]}

    baseline_counts = total_counts("baseline")
    baseline_seconds = sum(item["baseline"]["seconds"] for item in items)
    results = {}
    for name in methods:
        rows = [item[name] for item in items]
        counts, seconds = total_counts(name), sum(row["seconds"] for row in rows)
        flops = 0.0 if name == "identity" else analytic_flops_ratio(specs[name], NUM_STEPS)
        if flops is None:
            flops = qwenimage_counted_flops_ratio(real_shape(REFERENCE_AREA), counts, baseline_counts)
        finite = lambda key: [float(r[key]) for r in rows if math.isfinite(float(r[key]))]  # noqa: E731 - identical: inf
        result = {key: summarise(finite(key)) if finite(key) else None
                  for key in ("psnr_vs_baseline", "ssim_vs_baseline", "psnr_vs_target", "ssim_vs_target")}
        result["identical_to_baseline"] = sum(not math.isfinite(float(r["psnr_vs_baseline"])) for r in rows)
        colour = [float(r["colour_right"]) for r in rows if r["colour_right"] is not None]
        result["recolour_accuracy"] = summarise(colour) if colour else None
        result["flops_ratio_real"] = round(flops, 4)
        result["speedup_measured"] = (round(baseline_seconds / seconds, 3)
                                      if timed and name != "identity" and seconds else None)
        result["transformer_seconds"] = round(seconds, 3) if timed else None
        result["work_counts"] = counts
        result["per_type_psnr_vs_target"] = {}
        for edit_type in sorted({s.edit_type for s in samples}):
            chosen = [float(r["psnr_vs_target"]) for s, r in zip(samples, rows) if s.edit_type == edit_type]
            result["per_type_psnr_vs_target"][edit_type] = summarise(chosen)
        results[name] = result
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

    from cli import ModuleTimer, machine_info
    from data.edit_task import make_edit, make_split
    from evaluation.records import RecordsError, gather_in_order, model_identity, open_run_records, process_state, shard
    from models.tiny.edit_testbed import NUM_STEPS, run_edit, shipped_pipeline
    from pruning.edit.step_caches import WorkCounter, calibrate_mag_ratios

    specs = method_specs()
    samples = make_split("test", args.num_edits, seed=args.seed)
    variants = {"default": False} if args.no_zero_cond_t else {"default": False, "zero_cond_t": True}
    state = process_state("cpu")  # one process, or one of `accelerate launch --num_processes N` (CPU processes)
    sharded = state.num_processes > 1
    identity = {"evaluator": "eval_edit", **model_identity(args.model_path), "seed": args.seed,
                "num_edits": args.num_edits, "methods": methods, "variants": list(variants)}
    try:
        records = open_run_records(args.records, identity, state, resume=args.resume)
    except RecordsError as error:
        raise UserError(str(error)) from None
    resumed = len(records.done)
    mine = shard(len(samples), state.process_index, state.num_processes)
    report = {"settings": {"num_edits": args.num_edits, "seed": args.seed, "split": "test", "steps": NUM_STEPS,
                           "model_path": str(args.model_path), "methods": methods},
              "machine": machine_info(torch, torch.device("cpu")), "variants": {},
              "processes": state.num_processes, "records_file": str(args.records), "resumed_records": resumed}
    begin = time.perf_counter()
    todo = sum(f"{variant}/{i}" not in records.done for variant in variants for i in mine)
    with tqdm(total=todo * len(methods), desc="edits", unit="edit", dynamic_ncols=True,
              disable=not state.is_main_process) as bar:
        for variant, zero_cond_t in variants.items():
            pipe = shipped_pipeline(zero_cond_t=zero_cond_t, path=args.model_path)
            mag_ratios = None
            if "mag_cache" in methods:  # every process calibrates on the same validation edit: the same ratios
                calibration = make_edit(args.seed, "val", 0)
                mag_ratios = calibrate_mag_ratios(lambda: run_edit(pipe, calibration), pipe.transformer, NUM_STEPS)
            timer, counter = ModuleTimer(pipe.transformer), WorkCounter(pipe.transformer)
            pairs = []
            try:
                for i in mine:
                    key = f"{variant}/{i}"
                    if key not in records.done:
                        with torch.no_grad():
                            item = edit_item(pipe, samples[i], i, methods, specs, mag_ratios, timer, counter)
                        records.append(key, item)
                        bar.update(len(methods))
                    pairs.append((i, records.done[key]))
            finally:
                timer.remove()
                counter.remove()
            items = gather_in_order(pairs, state if sharded else None)
            if state.is_main_process:
                report["variants"][variant] = aggregate(samples, methods, specs, items, timed=not sharded)
                report["variants"][variant]["mag_ratios"] = mag_ratios
    if not state.is_main_process:
        return 0
    report["seconds"] = round(time.perf_counter() - begin, 1)
    if sharded:
        report["timing_note"] = (f"sharded over {state.num_processes} processes: quality and FLOPs only; the times of "
                                 "processes sharing a machine are not the method's (run one process for the speedup)")
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
    if sharded:
        print(f"\nnote: {report['timing_note']}")
    print(f"\nstats in {stats_path}, plot in {args.output_dir / 'quality_vs_speed.png'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
