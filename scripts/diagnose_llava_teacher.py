#!/usr/bin/env python
"""How much the unpruned LLaVA base's own attention knows about which vision tokens an answer needs.

For held-out cluttered-scene questions, the attention the answer rows give the image tokens (eager attention,
teacher-forced answer) is read per layer, averaged over heads (and, separately, head 0 alone). Reported:

- ``recall@k``: the fraction of the asked objects' patches among the ``k`` most attended tokens, next to what a
  random choice of ``k`` gets;
- the accuracy of a one-shot selection before layer 0 that keeps the ``k`` tokens the chosen layers attend to most:
  what a selector that predicted this attention perfectly could reach at budget ``k / 256`` (an upper bound for
  attention distillation, not a method: it needs the unpruned pass);
- the same with the asked objects' own patches kept first (the ground truth of the generated scene), the rest by
  attention: what keeping exactly the evidence buys.

    python scripts/diagnose_llava_teacher.py --num-questions 200 --keep 64 --output runs/teacher_diag.json
"""

from __future__ import annotations

from pathlib import Path

from cli import ArgumentParser, UserError, run_cli, set_torch_threads, write_json


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="base LLaVA directory (default: the shipped clutter base)")
    p.add_argument("--num-questions", type=int, default=200)
    p.add_argument("--keep", type=int, default=64, help="tokens kept by the oracle selection (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--output", type=Path, default=None, help="JSON report")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.num_questions < 1 or args.keep < 1 or args.batch_size < 1:
        raise UserError("--num-questions, --keep and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_torch_threads(args.threads)
    import numpy as np
    import torch

    from data.vqa_clutter import GRID, make_split, object_patches
    from data.vqa_shapes import accuracy_by_type, encode_batch, generate_answers
    from models.tiny.llava_vqa import load_pruning_base, shipped_clutter_base
    from pruning.llava.modules import answer_position_mask
    from pruning.llava.runtime import ForcedSelector, attach_pruning, detach_pruning

    path = args.model_path or shipped_clutter_base()
    processor, model = load_pruning_base(path)
    model.eval()
    samples = make_split("heldout", args.num_questions, seed=args.seed)
    layers = model.config.text_config.num_hidden_layers
    image_id = model.config.image_token_id
    saved = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "eager"
    mean_heads, head0, targets = [], [], []
    with torch.no_grad():
        for start in range(0, len(samples), args.batch_size):
            chunk = samples[start:start + args.batch_size]
            batch = encode_batch(processor, chunk, True)
            batch.pop("question_mask")
            labels = batch.pop("labels")
            rows = answer_position_mask(labels).float()  # [B, T]
            out = model(**batch, output_attentions=True)
            cols = batch["input_ids"] == image_id  # [B, T]
            for attn in [out.attentions]:
                per_layer = torch.stack([a.float() for a in attn], 1)  # [B, L, H, T, T]
                answer = (per_layer * rows[:, None, None, :, None]).sum(3) / rows.sum(1)[:, None, None, None]
                vision = torch.stack([answer[b][..., cols[b]] for b in range(len(chunk))])  # [B, L, H, V]
                mean_heads.append(vision.mean(2))
                head0.append(vision[:, :, 0])
            targets += [object_patches(s.shapes, s.asked, GRID) for s in chunk]
    model.config.text_config._attn_implementation = saved
    mean_heads, head0 = torch.cat(mean_heads), torch.cat(head0)  # [N, L, V]
    target = torch.from_numpy(np.stack(targets))  # [N, V] bool
    k = args.keep

    def recall(scores):  # [N, V]
        top = scores.topk(k, dim=-1).indices
        hit = target.gather(1, top).sum(1).float()
        return float((hit / target.sum(1).clamp(min=1)).mean())

    report = {"model_path": path, "num_questions": len(samples), "keep": k,
              "random_recall": k / target.shape[1], "recall_mean_heads": {}, "recall_head0": {}}
    for layer in range(layers):
        report["recall_mean_heads"][layer] = recall(mean_heads[:, layer])
        report["recall_head0"][layer] = recall(head0[:, layer])
    groups = {"all layers": range(layers), "layers 2-5": range(2, min(6, layers)), "layers 4-7": range(4, layers)}
    report["recall_groups"] = {name: recall(mean_heads[:, list(g)].mean(1)) for name, g in groups.items()}
    print(f"recall@{k} of the asked objects' patches (random {report['random_recall']:.3f})")
    for layer in range(layers):
        print(f"  layer {layer}: mean over heads {report['recall_mean_heads'][layer]:.3f}, "
              f"head 0 {report['recall_head0'][layer]:.3f}")
    for name, value in report["recall_groups"].items():
        print(f"  {name} (mean over heads): {value:.3f}")

    report["oracle_accuracy"] = {}
    selections = {f"top {k} by {name}": mean_heads[:, list(group)].mean(1) for name, group in groups.items()}
    # the asked objects' own patches first (ground truth, all of them when they fit), the rest by attention
    selections[f"asked objects' patches, then by all layers, {k} in all"] = mean_heads.mean(1) + 1e3 * target.float()
    for name, scores in selections.items():
        keep = torch.zeros_like(target).scatter_(1, scores.topk(k, dim=-1).indices, True)
        answers = []
        for start in range(0, len(samples), args.batch_size):
            pruning = attach_pruning(model, use_merger=False, use_pruners=False,
                                     selectors={0: ForcedSelector(keep[start:start + args.batch_size])}).eval()
            answers += generate_answers(model, processor, samples[start:start + args.batch_size],
                                        batch_size=args.batch_size)
            detach_pruning(model)
            del pruning
        acc = accuracy_by_type(samples, answers)
        report["oracle_accuracy"][name] = acc
        print(f"one-shot oracle ({name}): " + ", ".join(f"{t} {v:.3f}" for t, v in acc.items()))
    if args.output:
        write_json(args.output, report)
    return 0


if __name__ == "__main__":
    run_cli(main)
