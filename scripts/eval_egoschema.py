#!/usr/bin/env python
"""EgoSchema-style multiple-choice evaluation of PruneVid presets on Qwen2.5-VL (``make eval-egoschema``).

Default: the generated EgoSchema-format set (:func:`data.egoschema.synthetic_egoschema`: 12 short
videos of moving coloured shapes, questions such as "Which direction does the red square move?")
on the embedded tiny Qwen2.5-VL, every preset, on CPU. The embedded model has random weights, so its
accuracy is at chance level (1 in 5 = 20%): there only the agreement with the baseline, the token
counts, the compression and the times mean something. Real data and weights::

    python scripts/eval_egoschema.py --questions EgoSchema/questions.json --answers EgoSchema/subset_answers.json \\
        --missing-answers skip --video-dir EgoSchema/videos \\
        --model-path Qwen/Qwen2.5-VL-7B-Instruct --device cuda --output runs/egoschema.json

The file format (official ``questions.json`` records with ``q_uid``, ``question``, ``option 0`` ..
``option 4``; answers from an ``answer`` field or ``subset_answers.json``; videos
``<video-dir>/<q_uid>.mp4`` or another container decord reads) is documented in
:mod:`data.egoschema`. Each question is answered by ``Qwen25VLPruneVid.process_egoschema_sample``
(the option letter with the highest logit at the first generated position) for each preset of
``--presets``; the model is loaded once and every preset is a ``with_config`` view of it.

Per preset the report holds: ``accuracy`` (over the labelled questions), mean visual tokens entering
and leaving stage 1 and stage 2, ``mean_total_compression`` (``1 - tokens after stage 2 / tokens
before stage 1``), ``mean_ttft_s`` and ``ttft_speedup`` over the baseline, ``mean_seconds_per_question``
(the whole call: video decoding, preprocessing, generation) and ``agreement_with_baseline`` (fraction
of questions where the prediction equals the ``baseline`` preset's; ``null`` when ``baseline`` is not
in ``--presets``). ``questions`` holds every prediction. Bad input: one line on stderr, exit code 2,
nothing written. Checked before the model is loaded: every flag, ``--output``, ``--device``, every
video (opened), and each question's text (question, options, chat template) plus ``--max-new-tokens``
against the model's context; the exact prompt with its video tokens is checked again per question
(still one line, nothing written). The JSON is written once, at the end, through a temporary file
renamed into place; Ctrl-C exits 130 and leaves no JSON.

Each question's record (every preset's prediction, logits, token counts and times) is appended to ``--records``
(default: the output's name with ``.records.jsonl``) as soon as it is answered; ``--resume`` skips the questions
already there for the same model, presets and data, and refuses (one line) records of another configuration
(:mod:`evaluation.records`). Under ``accelerate launch --num_processes N`` (or ``torchrun``) the questions are split
between the processes and their records gathered, in question order, on the main process, which alone writes the
JSON; the result is the one-process result, except that the times are left out (processes that share a machine do
not time the method; the report says so). On a machine without GPUs accelerate starts several processes through its
torchrun path: ``accelerate launch --multi_gpu --num_processes 2 scripts/eval_egoschema.py ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time
from pathlib import Path

from cli import (
    ArgumentParser,
    UserError,
    check_device,
    check_output_file,
    configure_torch_threads,
    machine_info,
    run_cli,
    write_json,
)
from evaluation.records import add_records_arguments

DEFAULT_PRESETS = ("baseline", "stage2_only", "stage1_only", "default", "conservative", "aggressive")
CHANCE_LEVEL = 0.2


def _preset_list(text: str) -> tuple[str, ...]:
    from pruning.video.prunevid import PRESETS

    names = tuple(item.strip() for item in text.split(","))
    if not names or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of preset names, got {text!r}")
    for name in names:
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a preset is listed twice: {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    from data.egoschema import MISSING_ANSWER_POLICIES

    p = ArgumentParser(prog="eval_egoschema.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=Path, default=None,
                   help="EgoSchema-format questions JSON (default: the generated set for the embedded model)")
    p.add_argument("--video-dir", type=Path, default=None, help="folder of <q_uid>.mp4 videos (required with --questions)")
    p.add_argument("--answers", type=Path, default=None,
                   help="answers JSON {q_uid: index} (subset_answers.json); default: the records' 'answer' fields")
    p.add_argument("--missing-answers", default="error", choices=MISSING_ANSWER_POLICIES,
                   help="unlabelled questions: error (default), skip them, or keep them (accuracy over the labelled ones)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    p.add_argument("--synthetic-questions", type=int, default=12, help="size of the generated set (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated set (default 0)")
    p.add_argument("--presets", type=_preset_list, default=DEFAULT_PRESETS,
                   help=f"comma list (default {','.join(DEFAULT_PRESETS)})")
    p.add_argument("--output", type=Path, default=Path("egoschema_results.json"),
                   help="the results JSON (default ./egoschema_results.json)")
    p.add_argument("--model-path", default=None, help="Qwen2.5-VL directory or hub id (default: the embedded tiny model)")
    p.add_argument("--num-frames", type=int, default=16, help="frames sampled uniformly from each video (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=8,
                   help="greedy tokens generated per answer (the prediction uses the first position's logits; default 8)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--attn-implementation", default=None, choices=("sdpa", "eager"), help="default: the model's (sdpa)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 for the embedded tiny model on CPU; torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    add_records_arguments(p, each="one JSON line per question as it finishes",
                          default="--output with the suffix .records.jsonl", same="model, presets and data")
    args = p.parse_args(argv)
    if args.records is None:
        args.records = args.output.with_suffix(".records.jsonl")
    return args


def validate(args) -> None:
    for flag, value, minimum in (("--num-frames", args.num_frames, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                                 ("--limit", args.limit, 1), ("--threads", args.threads, 1),
                                 ("--synthetic-questions", args.synthetic_questions, 1), ("--seed", args.seed, 0)):  # fmt: skip
        if value is not None and value < minimum:
            raise UserError(f"{flag} must be >= {minimum}, got {value}")
    if args.questions is None and (args.video_dir is not None or args.answers is not None):
        raise UserError("--video-dir / --answers describe your own set: pass its questions file with --questions too")
    if args.questions is not None and args.video_dir is None:
        raise UserError("--questions needs --video-dir (the folder holding <q_uid>.mp4)")
    check_output_file(args.output, "--output")
    check_output_file(args.records, "--records")
    if args.records.resolve() == args.output.resolve():
        raise UserError("--records and --output must be different files")
    check_device(args.device)


def load_questions(args):
    """The questions (validated, videos found), and the files they came from."""
    from data.egoschema import EgoSchemaError, EgoSchemaFiles, load_egoschema, synthetic_egoschema

    try:
        if args.questions is None:
            files = synthetic_egoschema(num_questions=args.synthetic_questions, seed=args.seed)
        else:
            files = EgoSchemaFiles(args.questions, args.answers, args.video_dir)
        questions = load_egoschema(
            files.questions, files.video_dir, files.answers, missing_answers=args.missing_answers, limit=args.limit
        )
    except EgoSchemaError as error:
        raise UserError(str(error)) from None
    return questions, files


def check_videos(questions, num_frames: int) -> None:
    """Open every video (one frame decoded) so a bad file fails before the model is loaded (no progress bar:
    a failure here is the only line on stderr)."""
    from pipelines.video_io import load_video

    for q in questions:
        try:
            video = load_video(q.video_path, 1)
        except (OSError, ValueError) as error:
            raise UserError(f"q_uid {q.q_uid!r}: {error}") from None
        if video.total_frames < num_frames:
            raise UserError(
                f"q_uid {q.q_uid!r}: video {str(q.video_path)!r} has {video.total_frames} frames, fewer than "
                f"--num-frames {num_frames}: lower --num-frames"
            )


def check_against_model(args, questions):
    """Read the model's config and processor (not its weights) and check each question's text (question,
    lettered options, chat template) plus ``--max-new-tokens`` against the model's context. Returns the processor."""
    from pipelines.prunevid import (
        build_multiple_choice_question,
        check_prompt_fits,
        context_length,
        load_config_and_processor,
        prompt_text_tokens,
    )

    try:
        model_config, processor = load_config_and_processor(args.model_path)
    except ValueError as error:
        raise UserError(str(error).splitlines()[0]) from None
    context = context_length(model_config)
    for q in questions:
        tokens = prompt_text_tokens(processor, build_multiple_choice_question(q.question, list(q.options)))
        try:
            check_prompt_fits(tokens, None, args.max_new_tokens, context)
        except ValueError as error:
            raise UserError(f"q_uid {q.q_uid!r}: {error}") from None
    return processor


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(records: list[dict], presets: tuple[str, ...]) -> dict:
    summary = {}
    for name in presets:
        rows = [r["presets"][name] for r in records]
        labelled = [(r["answer"], r["presets"][name]["prediction"]) for r in records if r["answer"] is not None]
        summary[name] = {
            "accuracy": sum(a == p for a, p in labelled) / len(labelled) if labelled else None,
            "num_labelled": len(labelled),
            "num_questions": len(rows),
            "mean_tokens_before_stage1": _mean(x["tokens_before_stage1"] for x in rows),
            "mean_tokens_after_stage1": _mean(x["tokens_after_stage1"] for x in rows),
            "mean_tokens_before_stage2": _mean(x["tokens_before"] for x in rows),
            "mean_tokens_after_stage2": _mean(x["tokens_after"] for x in rows),
            "mean_total_compression": _mean(x["total_compression_ratio"] for x in rows),
            "mean_ttft_s": _mean(x["ttft_s"] for x in rows),
            "mean_seconds_per_question": _mean(x["seconds"] for x in rows),
            "mean_kv_cache_bytes": _mean(x["kv_cache_bytes"] for x in rows),
        }
    base = summary.get("baseline")
    for name, s in summary.items():
        if base is None:
            s.update(agreement_with_baseline=None, accuracy_delta_vs_baseline=None, ttft_speedup=None)
            continue
        same = sum(r["presets"][name]["prediction"] == r["presets"]["baseline"]["prediction"] for r in records)
        s["agreement_with_baseline"] = same / len(records)
        s["accuracy_delta_vs_baseline"] = (
            s["accuracy"] - base["accuracy"] if s["accuracy"] is not None and base["accuracy"] is not None else None
        )
        s["ttft_speedup"] = base["mean_ttft_s"] / s["mean_ttft_s"] if s["mean_ttft_s"] else None
    return summary


def print_table(summary: dict) -> None:
    pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
    print(f"{'preset':<13} {'accuracy':>8} {'visual tokens: in -> stage 1 -> stage 2':>40} {'compr':>6} "
          f"{'TTFT s':>8} {'speedup':>7} {'s/question':>10} {'agree':>6}")  # fmt: skip
    for name, s in summary.items():
        tokens = f"{s['mean_tokens_before_stage1']:.1f} -> {s['mean_tokens_after_stage1']:.1f} -> {s['mean_tokens_after_stage2']:.1f}"
        speedup = f"{s['ttft_speedup']:.2f}x" if s["ttft_speedup"] is not None else "-"
        number = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(
            f"{name:<13} {pct(s['accuracy']):>8} {tokens:>40} {pct(s['mean_total_compression']):>6} "
            f"{number(s['mean_ttft_s'], '.4f'):>8} {speedup:>7} {number(s['mean_seconds_per_question'], '.3f'):>10} "
            f"{pct(s['agreement_with_baseline']):>6}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    validate(args)
    questions, files = load_questions(args)
    check_videos(questions, args.num_frames)
    processor = check_against_model(args, questions)

    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from evaluation.records import RecordsError, gather_in_order, model_identity, open_run_records, process_state, shard
    from pipelines.prunevid import Qwen25VLPruneVid

    state = process_state(args.device)
    sharded = state.num_processes > 1
    if sharded and args.device is None and state.device.type != "cpu":
        args.device = str(state.device)  # each process on its own GPU
    hf_logging.disable_progress_bar()
    configure_torch_threads(args.threads, args.model_path, args.device)
    try:
        base = Qwen25VLPruneVid(
            args.model_path, preset="baseline", num_frames=args.num_frames,
            device=args.device, attn_implementation=args.attn_implementation, _processor=processor,
        )  # fmt: skip
        pipes = {name: base.with_config(name) for name in args.presets}
    except (OSError, ValueError) as error:
        raise UserError(str(error).splitlines()[0]) from None

    def answer(pipe, q):
        try:
            start = time.perf_counter()
            prediction, text, stats = pipe.process_egoschema_sample(
                q.video_path, q.question, list(q.options), max_new_tokens=args.max_new_tokens
            )
            return prediction, text, stats, time.perf_counter() - start
        except (OSError, ValueError) as error:
            raise UserError(f"q_uid {q.q_uid!r}: {str(error).splitlines()[0]}") from None

    identity = {
        "evaluator": "eval_egoschema", **model_identity(args.model_path), "num_frames": args.num_frames,
        "max_new_tokens": args.max_new_tokens, "attn_implementation": args.attn_implementation,
        "presets": {name: dataclasses.asdict(pipe.config) for name, pipe in pipes.items()},
        "questions": [(q.q_uid, q.question, list(q.options), q.answer, str(q.video_path)) for q in questions],
    }  # fmt: skip
    try:
        run_records = open_run_records(args.records, identity, state, resume=args.resume)
    except RecordsError as error:
        raise UserError(str(error)) from None
    resumed = len(run_records.done)
    mine = shard(len(questions), state.process_index, state.num_processes)
    todo = [i for i in mine if questions[i].q_uid not in run_records.done]
    done_here = [(i, run_records.done[questions[i].q_uid]) for i in mine if questions[i].q_uid in run_records.done]
    if done_here and state.is_main_process:
        print(f"--resume: {len(done_here)} of this process's {len(mine)} questions already recorded in {args.records}")
    if todo:
        answer(pipes[args.presets[0]], questions[todo[0]])  # warm-up (first-call allocations), not reported
    pairs = list(done_here)
    # counts answers: every question of this process once per preset
    progress = tqdm(total=len(todo) * len(args.presets), desc="answer (question x preset)", unit="answer",
                    disable=args.no_progress or not state.is_main_process, file=sys.stderr)  # fmt: skip
    for index in todo:
        q = questions[index]
        record = {"q_uid": q.q_uid, "question": q.question, "answer": q.answer, "video": str(q.video_path), "presets": {}}
        for name, pipe in pipes.items():
            prediction, text, stats, seconds = answer(pipe, q)
            record["presets"][name] = {
                "prediction": prediction,
                "correct": prediction == q.answer if q.answer is not None else None,
                "prediction_letter": stats["prediction_letter"],
                "answer_from_text": stats["answer_from_text"],
                "generated_text": text,
                "option_logits": stats["option_logits"],
                **{key: stats[key] for key in ("tokens_before_stage1", "tokens_after_stage1", "tokens_before", "tokens_after",
                                               "total_compression_ratio", "ttft_s", "kv_cache_bytes", "num_segments")},  # fmt: skip
                "seconds": seconds,
            }
            progress.update()
        run_records.append(q.q_uid, record)
        pairs.append((index, record))
    progress.close()
    records = gather_in_order(pairs, state if sharded else None)
    if not state.is_main_process:
        return 0

    summary = summarise(records, args.presets)
    if sharded:  # several processes share the machine: their times are not the method's
        for s in summary.values():
            for key in ("mean_ttft_s", "mean_seconds_per_question", "ttft_speedup"):
                s[key] = None
    report = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["eval_egoschema.py", *argv]),
        "machine": machine_info(torch, base.device),
        "model_path": base.model_path,
        "questions_file": str(files.questions),
        "answers_file": str(files.answers) if files.answers is not None else None,
        "video_dir": str(files.video_dir),
        "generated_set": args.questions is None,
        "num_questions": len(records),
        "num_frames": args.num_frames,
        "max_new_tokens": args.max_new_tokens,
        "presets": list(args.presets),
        "pruning_layer": {name: pipe.config.pruning_layer if pipe.config.enable_pruning else None for name, pipe in pipes.items()},
        "chance_level": CHANCE_LEVEL,
        "summary": summary,
        "processes": state.num_processes,
        "records_file": str(args.records),
        "resumed_questions": resumed,
        "questions": records,
    }
    if sharded:
        report["timing_note"] = (
            f"sharded over {state.num_processes} processes: accuracy and agreement only; the times of processes "
            "sharing a machine are not the method's (run one process for the speed table)")
    if args.model_path is None:
        report["note"] = (
            "embedded tiny model with random weights: accuracy is at chance level (20%, 1 of 5 options); only the "
            "agreement with the baseline, the token counts, the compression and the times are meaningful. "
            "Pass --model-path for real weights."
        )
    source = "generated set" if args.questions is None else str(files.questions)
    print(f"{len(records)} questions ({source}), model {base.model_path}, {args.num_frames} frames per video")
    print_table(summary)
    if "note" in report:
        print(f"note: {report['note']}")
    if "timing_note" in report:
        print(f"note: {report['timing_note']}")
    write_json(args.output, report)
    print(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
