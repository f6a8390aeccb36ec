#!/usr/bin/env python
"""What a cluttered-scene LLaVA base knows at the answer position of a position question, layer by layer.

"Is the red square above the green circle?" is answered yes exactly when the comparison of the two objects along the
relation's axis agrees with the relation's direction: an XOR of two features. For the held-out position questions,
the hidden state of the last prompt row after every layer is probed (linear probes fitted on ``val`` questions,
tested on ``heldout`` ones) for:

- ``axis``: the relation word's axis (x for left of / right of, y for above / below);
- ``direction``: left / above vs right / below;
- ``comparison``: whether the first object lies before or after the second along that axis;
- ``answer``: yes / no (their XOR), linearly and with a one-hidden-layer MLP probe.

    python scripts/diagnose_llava_position.py --output runs/position_probes.json
    python scripts/diagnose_llava_position.py --model-path runs/llava_clutter_base/phase2
"""

from __future__ import annotations

import re
from pathlib import Path

from cli import ArgumentParser, UserError, check_model_path, run_cli, set_torch_threads, write_json


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="base LLaVA directory (default: the shipped clutter base)")
    p.add_argument("--fit-questions", type=int, default=1600, help="position questions the probes are fitted on")
    p.add_argument("--test-questions", type=int, default=400, help="held-out position questions they are tested on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON report")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.fit_questions < 10 or args.test_questions < 10:
        raise UserError("--fit-questions and --test-questions must be >= 10")
    check_model_path(args.model_path)
    return args


def position_questions(split: str, count: int, seed: int):
    from data.vqa_clutter import QUESTION_TYPES, make_split

    samples = make_split(split, count * len(QUESTION_TYPES), seed=seed)  # held-out splits cycle the types
    return [s for s in samples if s.qtype == "position"][:count]


def features(model, processor, samples, batch_size: int = 50):
    """``[N, layers + 1, D]`` last-prompt-row states, and the targets ``{name: [N]}``."""
    import torch

    from data.vqa_clutter import RELATIONS, comparison_targets
    from data.vqa_shapes import encode_batch

    states, targets = [], {"axis": [], "direction": [], "comparison": [], "answer": []}
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            batch = encode_batch(processor, chunk, False)
            batch.pop("question_mask")
            out = model(**batch, output_hidden_states=True)
            states.append(torch.stack([h[:, -1] for h in out.hidden_states], 1))
            for sample in chunk:
                relation = re.search(r"(left of|right of|above|below)", sample.question).group(1)
                axis, sign = RELATIONS[relation]
                vertical, horizontal = comparison_targets(sample.shapes, sample.asked)
                targets["axis"].append(axis)
                targets["direction"].append(int(sign > 0))
                targets["comparison"].append(int((horizontal if axis == 0 else vertical) == 2))
                targets["answer"].append(int(sample.answer == "yes"))
    return torch.cat(states), {k: torch.tensor(v) for k, v in targets.items()}


def probe_accuracy(x, y, x_test, y_test, hidden: int = 0, seed: int = 0) -> float:
    """Held-out accuracy of a linear (``hidden=0``) or one-hidden-layer probe fitted with AdamW."""
    import torch

    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x, x_test = (x - mean) / std, (x_test - mean) / std
    classes = int(max(y.max(), y_test.max())) + 1
    net = (torch.nn.Linear(x.shape[1], classes) if hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes)))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01 if hidden == 0 else 3e-3, weight_decay=1e-2)
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((net(x_test).argmax(-1) == y_test).float().mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    set_torch_threads(args.threads)
    from models.tiny.llava_vqa import load_pruning_base, shipped_clutter_base

    path = args.model_path or shipped_clutter_base()
    processor, model = load_pruning_base(path)
    model.eval()
    fit = position_questions("val", args.fit_questions, args.seed)
    test = position_questions("heldout", args.test_questions, args.seed)
    x_fit, y_fit = features(model, processor, fit)
    x_test, y_test = features(model, processor, test)
    report = {"model_path": path, "fit_questions": len(fit), "test_questions": len(test), "layers": []}
    print(f"{path}: probes fitted on {len(fit)} val position questions, tested on {len(test)} held-out ones")
    print("state after   axis  direction  comparison  answer (linear)  answer (MLP)")
    for layer in range(x_fit.shape[1]):
        row = {name: probe_accuracy(x_fit[:, layer], y_fit[name], x_test[:, layer], y_test[name])
               for name in ("axis", "direction", "comparison", "answer")}
        row["answer_mlp"] = probe_accuracy(x_fit[:, layer], y_fit["answer"], x_test[:, layer], y_test["answer"],
                                           hidden=256)
        report["layers"].append({"layer": layer, **row})
        name = "embeddings" if layer == 0 else f"layer {layer - 1}"
        print(f"{name:<12}  {row['axis']:.3f}  {row['direction']:.3f}      {row['comparison']:.3f}       "
              f"{row['answer']:.3f}            {row['answer_mlp']:.3f}")
    if args.output:
        write_json(args.output, report)
    return 0


if __name__ == "__main__":
    run_cli(main)
