"""The embedded shapes-VQA LLaVA: the tiny LLaVA-1.5 trained on the generated task (the base system C prunes).

How it is trained and why is the docstring of ``scripts/train_llava_base.py`` (``make``-free:
``trained_base_dir()`` trains it into the embedded-model cache on first use).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from cli import UserError, atomic_path, load_or_explain, write_json
from models.tiny.training import lr_factor, optimizer_step, resume_checkpoint, save_checkpoint

BASE_VERSION = 1
"""Bump whenever the defaults below or the task change the trained directory."""

DEFAULTS = dict(steps=1200, batch_size=16, lr=1.5e-3, warmup=50, weight_decay=0.01, aux_weight=3.0, embed_std=0.5,
                qk_std=0.1, turns=4, text_loss=1, clip=5.0, seed=0, eval_size=400, position_weight=0.0,
                sincos_positions=0.0, readout_weight=0.0, readout_layer=-3, tower_steps=0, tower_lr=1e-3,
                freeze_tower=0, attention_weight=0.0, value_weight=0.0, evidence_heads=1, readout_comparisons=0,
                readout_relation=0, position_share=0.0)
CLUTTER_DEFAULTS = {**DEFAULTS, "steps": 2500, "aux_weight": 1.0, "position_weight": 1.0, "sincos_positions": 0.5,
                    "readout_weight": 1.0, "tower_steps": 800, "freeze_tower": 1, "attention_weight": 0.3,
                    "value_weight": 1.0}
"""The shipped cluttered-scene base's settings (``make train-llava-base``): the tower pretrained alone on per-patch
targets for 800 steps, then frozen for 2500 steps of LLaVA training with the position, dense and readout probes and
the attention and value supervision at each answer position."""
CLUTTER_FINETUNE = {**CLUTTER_DEFAULTS, "steps": 1500, "lr": 7.5e-4, "tower_steps": 0, "embed_std": 0.0, "qk_std": 0.0,
                    "sincos_positions": 0.0, "evidence_heads": 2, "readout_comparisons": 1, "text_loss": 0}
"""Phase 2 of the shipped base: 1500 more steps from phase 1's model (no re-initialisation: no embedding, q/k or
position-table rescaling, no tower pretraining; the tower stays frozen), at half the peak learning rate, with the
position and relation questions' two objects each read by its own head (``evidence_heads=2``), the readout probes also
reading where the first object lies from the second (``readout_comparisons``), and the answers alone supervised
(``text_loss=0``: the question words no longer outweigh them). Phase 1 left position questions at chance
(docs/BENCHMARKS.md)."""
CLUTTER_POSITION = {**CLUTTER_FINETUNE, "steps": 800, "lr": 5e-4, "readout_relation": 1, "position_share": 0.4}
"""Phase 3 of the shipped base: 800 more steps from phase 2's model, at a third of phase 1's peak learning rate, with
two in five questions position questions (``position_share``) and three more readout probes at the answer position
(``readout_relation``): the relation word's axis and direction, and whether the first object lies on that side of
the second. Phase 2 left position questions at chance: at the answer position the comparison along the asked axis
read out linearly at 0.80, the relation's direction only at 0.77, and the yes / no answer, their XOR, at chance even
for an MLP probe (docs/BENCHMARKS.md)."""
CLUTTER_SCHEDULE = {"eval_every": 250, "val_size": 100}
"""Its validation (and checkpoint) schedule."""
METRICS_FILE = "vqa_base_metrics.json"


CLUTTER_BASE_DIR = Path(__file__).resolve().parents[1] / "trained" / "llava_clutter"
"""The shipped base of the cluttered-scene task (trained here; ``README.md`` beside it says how)."""


def shipped_clutter_base() -> str:
    """:data:`CLUTTER_BASE_DIR`, the default base of the cluttered-scene task; a one-line error when its files are
    missing from this checkout."""
    if not (CLUTTER_BASE_DIR / "config.json").is_file():
        raise UserError(f"no cluttered-scene base at {CLUTTER_BASE_DIR}: restore it from the repository, retrain it "
                        "with `make train-llava-base` (~90 min), or pass --model-path")
    return str(CLUTTER_BASE_DIR)


def load_pruning_base(model_path: str | Path, **from_pretrained_kwargs):
    """``(processor, model)`` of a base directory, the model as the forked ``LlavaForConditionalGeneration``
    (``models.llava``) that the pruning stages attach to; a one-line error when either cannot be loaded."""
    from transformers import AutoProcessor

    from models.llava.modeling_llava import LlavaForConditionalGeneration

    path = str(model_path)
    processor = load_or_explain("the LLaVA processor", path, lambda: AutoProcessor.from_pretrained(path))
    model = load_or_explain("the LLaVA model", path,
                            lambda: LlavaForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs))
    return processor, model

TASKS = {"shapes": "data.vqa_shapes", "clutter": "data.vqa_clutter"}
"""The generated VQA tasks a base can be trained on: the plain shapes task (112 px) and the cluttered scenes
(224 px, for the 224 px tiny LLaVA of ``models.tiny.llava.tiny_clutter_llava_dir``)."""


def task_module(task: str):
    """The data module of ``task`` (``make_sample``, ``make_conversation``, ``make_split``, ``patch_labels``,
    ``ANSWERS``)."""
    import importlib

    if task not in TASKS:
        raise ValueError(f"task={task!r}; allowed: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task])


def evaluate_base(model, processor, eval_size: int, seed: int, task: str = "shapes", split: str = "heldout") -> dict:
    """Exact-match accuracy per question type on the first ``eval_size`` questions of ``split`` (``heldout``: the
    reported numbers; ``val``: model selection during training), with chance levels."""
    from data.vqa_shapes import accuracy_by_type, chance_levels, generate_answers

    data = task_module(task)
    samples = data.make_split(split, eval_size, seed=seed)
    model.eval()
    predictions = generate_answers(model, processor, samples)
    return {
        "accuracy": accuracy_by_type(samples, predictions),
        "chance": chance_levels(samples, data.ANSWERS),
        "eval_size": eval_size,
        "examples": [
            {"question": s.question, "answer": s.answer, "prediction": p} for s, p in list(zip(samples, predictions))[:8]
        ],
    }


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """``[grid * grid, dim]`` 2-D sine-cosine position table (MAE's), row-major: half the channels encode the patch
    row, half its column, each as sines and cosines of geometrically spaced frequencies; unit RMS per row.
    ``sincos_positions`` starts the CLIP tower's learned position embeddings from it (times that scale), so the
    patch tokens carry where they are linearly from step 0."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = coords.repeat_interleave(grid), coords.repeat(grid)
    parts = [torch.sin(rows[:, None] * omega), torch.cos(rows[:, None] * omega),
             torch.sin(cols[:, None] * omega), torch.cos(cols[:, None] * omega)]
    table = torch.cat(parts, dim=1)
    table = torch.nn.functional.pad(table, (0, dim - table.shape[1]))
    return (table / table.pow(2).mean(dim=1, keepdim=True).sqrt()).float()


def train_base(model_path: str | Path, output_dir: Path, *, steps: int, batch_size: int, lr: float, warmup: int,
               weight_decay: float, aux_weight: float, embed_std: float, qk_std: float, turns: int, text_loss: int, clip: float, seed: int,
               eval_size: int, position_weight: float = 0.0, sincos_positions: float = 0.0,
               readout_weight: float = 0.0, readout_layer: int = -3, tower_steps: int = 0, tower_lr: float = 1e-3,
               freeze_tower: int = 0, attention_weight: float = 0.0, value_weight: float = 0.0, evidence_heads: int = 1,
               readout_comparisons: int = 0, readout_relation: int = 0, position_share: float = 0.0,
               task: str = "shapes",
               eval_every: int = 0, val_size: int = 200, checkpoint: Path | None = None, resume: bool = False,
               log=print) -> dict:
    """Train, evaluate and save; returns the metrics (also written to ``output_dir/vqa_base_metrics.json``).

    ``eval_every`` > 0: every that many steps, validation accuracy per type on ``val_size`` questions of the ``val``
    split goes to the JSON log, and the run is checkpointed to ``checkpoint`` (the log beside it, ``.json``);
    ``resume`` continues from that checkpoint (batches are functions of the step: the run ends where an uninterrupted
    one would).

    ``readout_weight`` > 0 (tasks whose conversations record the asked objects, ``data.vqa_clutter``): at every
    turn's answer position, linear probes on the LLM's hidden state ``readout_layer`` (an index into
    ``hidden_states``; -3: the output of the last layer but one) must read the colour, shape, patch row and column
    of the first two objects the question asks (``data.vqa_clutter.readout_targets``), so the layers before it learn
    to bring the asked objects' attributes to where the answer is made; ``readout_comparisons`` adds two heads that
    must read where the first of two objects lies from the second (``data.vqa_clutter.comparison_targets``);
    ``readout_relation`` three more that must read a relation word's axis and direction and whether the first object
    lies on that side of the second (``data.vqa_clutter.relation_targets``: a position question's answer, as two
    features the last layers only have to combine).

    ``position_share`` > 0 (clutter): that share of the conversations' questions are position questions (the other
    types share the rest equally); 0 draws the types uniformly.

    ``tower_steps`` > 0 (tasks with ``patch_targets``, ``data.vqa_clutter``): first that many steps pretrain the CLIP
    tower alone, at peak ``tower_lr``, with linear heads on its selected feature layer that must read each patch's
    object colour, shape, size and centre, and its row and column (our stand-in for CLIP's pretraining: the tower of
    LLaVA-1.5 comes trained);
    then ``steps`` steps train the whole LLaVA as below, with the tower frozen if ``freeze_tower`` (as LLaVA-1.5's
    is).

    ``attention_weight`` / ``value_weight`` > 0 (clutter): at each answer position, head 0 (and 1, with
    ``evidence_heads=2``) of the middle LLM layers is trained to look at the asked objects' patches and to bring back
    their attributes (:func:`evidence_losses`; the LLM runs eager attention while training, for the probabilities)."""
    from tqdm.auto import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from data.media import PALETTE, SHAPES
    from data.vqa_shapes import encode_batch, encode_conversations

    data = task_module(task)
    make_conversation, make_sample, patch_labels = data.make_conversation, data.make_sample, data.patch_labels

    torch.manual_seed(seed)
    processor = load_or_explain("the LLaVA processor", str(model_path), lambda: AutoProcessor.from_pretrained(model_path))
    model = load_or_explain("the LLaVA model", str(model_path),
                            lambda: LlavaForConditionalGeneration.from_pretrained(model_path))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if embed_std > 0:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb.mul_(embed_std / emb.std())
    if sincos_positions > 0:
        with torch.no_grad():
            table = model.model.vision_tower.embeddings.position_embedding.weight  # [1 + grid^2, D]
            grid_side = int(round((table.shape[0] - 1) ** 0.5))
            table[1:] = sincos_2d(grid_side, table.shape[1]) * sincos_positions
    if qk_std > 0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(qk_std / proj.weight.std())
    model.to(device).train()
    num_tokens = model.config.image_seq_length
    grid = int(round(num_tokens ** 0.5))
    layers = model.config.text_config.num_hidden_layers
    if readout_weight > 0 and not -(layers + 1) <= readout_layer <= layers:
        raise UserError(f"--readout-layer indexes the LLM's {layers + 1} hidden states: pass {-(layers + 1)}..{layers}, "
                        f"got {readout_layer}")
    if tower_steps > 0 and not hasattr(data, "patch_targets"):
        raise UserError(f"--tower-steps needs a task with per-patch tower targets (clutter), not {task!r}")
    if evidence_heads not in (1, 2):
        raise UserError(f"--evidence-heads must be 1 or 2, got {evidence_heads}")
    if (attention_weight > 0 or value_weight > 0) and not hasattr(data, "object_patches"):
        raise UserError(f"--attention-weight / --value-weight need a task that records the asked objects (clutter), "
                        f"not {task!r}")
    if readout_weight > 0 and not hasattr(data, "readout_targets"):
        raise UserError(f"--readout-weight needs a task that records the asked objects (clutter), not {task!r}")
    if (aux_weight > 0 or position_weight > 0 or readout_weight > 0) and grid * grid != num_tokens:
        raise UserError(f"--aux-weight needs a square patch grid, the model has {num_tokens} image tokens")
    width = model.config.text_config.hidden_size
    probe = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(PALETTE) + 1),
                                 "shape": torch.nn.Linear(width, len(SHAPES) + 1),
                                 "pair": torch.nn.Linear(width, len(PALETTE) * len(SHAPES) + 1),
                                 "row": torch.nn.Linear(width, grid), "column": torch.nn.Linear(width, grid),
                                 "readout": torch.nn.Linear(width, 2 * (len(PALETTE) + len(SHAPES) + 2 * grid)
                                                            + 6 * readout_comparisons)}).to(device)
    # the readout probe's 8 heads, in that order, and with readout_comparisons the 2 comparison heads (3 classes each)
    readout_sizes = [len(PALETTE), len(SHAPES), grid, grid] * 2 + [3, 3] * readout_comparisons
    if readout_relation:  # axis, direction, on that side (2 classes each)
        probe["relation"] = torch.nn.Linear(width, 6).to(device)
    type_weights = None
    if position_share > 0:
        if not 0 < position_share < 1 or "position" not in getattr(data, "QUESTION_TYPES", ()):
            raise UserError(f"--position-share must be in (0, 1) with a task that has position questions "
                            f"(clutter), got {position_share} with {task!r}")
        others = len(data.QUESTION_TYPES) - 1
        type_weights = [position_share if t == "position" else (1 - position_share) / others
                        for t in data.QUESTION_TYPES]
    vision_width = model.config.vision_config.hidden_size
    tower_classes = {**getattr(data, "TOWER_TARGET_CLASSES", {}), "row": grid, "column": grid}
    tower_probe = torch.nn.ModuleDict({name: torch.nn.Linear(vision_width, classes)
                                       for name, classes in tower_classes.items()}).to(device)
    # attention / value supervision: at each answer position, head 0 of the middle LLM layers must look at the asked
    # objects' patches (-log of its attention mass there), and what it brings back (its output, before o_proj) must
    # give the first asked object's colour and shape (linear probes)
    evidence_layers = tuple(range(max(1, layers // 4), max(2, 3 * layers // 4)))
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    captured: dict = {}
    hooks = []
    if value_weight > 0:
        for layer in evidence_layers:
            if evidence_heads == 1:
                probe[f"value{layer}_colour"] = torch.nn.Linear(head_dim, len(PALETTE)).to(device)
                probe[f"value{layer}_shape"] = torch.nn.Linear(head_dim, len(SHAPES)).to(device)
            for head in range(evidence_heads if evidence_heads > 1 else 0):
                for attribute, classes in (("colour", len(PALETTE)), ("shape", len(SHAPES)), ("row", grid),
                                           ("column", grid)):
                    probe[f"value{layer}_head{head}_{attribute}"] = torch.nn.Linear(head_dim, classes).to(device)
            hooks.append(model.model.language_model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
                lambda module, args, layer=layer: captured.__setitem__(f"heads{layer}", args[0])))
    saved_attention = model.config.text_config._attn_implementation
    if attention_weight > 0:  # attention probabilities for the supervision (SDPA does not return them)
        model.config.text_config._attn_implementation = "eager"
    # position_weight: every image token's projector output must also say its patch row and column linearly, so the
    # LLM can compare where two objects are (which the sequence order alone made it learn only slowly)
    patch_index = torch.arange(num_tokens, device=device)
    rows, columns = patch_index // grid, patch_index % grid
    params = (list(model.named_parameters()) + [(f"probe.{n}", p) for n, p in probe.named_parameters()]
              + [(f"tower_probe.{n}", p) for n, p in tower_probe.named_parameters()])
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    def schedule(step: int) -> float:  # the tower's pretraining, then the LLaVA training, each warmed up and decayed
        if step < tower_steps:
            return tower_lr / lr * lr_factor(step, tower_steps, warmup, floor=0.1)
        return lr_factor(step - tower_steps, steps, warmup, floor=0.1)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    settings = dict(model_path=str(model_path), steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                    weight_decay=weight_decay, aux_weight=aux_weight, embed_std=embed_std, qk_std=qk_std, turns=turns,
                    text_loss=text_loss, clip=clip, seed=seed, position_weight=position_weight,
                    sincos_positions=sincos_positions, readout_weight=readout_weight, readout_layer=readout_layer,
                    tower_steps=tower_steps, tower_lr=tower_lr, freeze_tower=freeze_tower,
                    attention_weight=attention_weight, value_weight=value_weight, task=task,
                    **({"evidence_heads": evidence_heads} if evidence_heads != 1 else {}),
                    **({"readout_comparisons": readout_comparisons} if readout_comparisons else {}),
                    **({"readout_relation": readout_relation} if readout_relation else {}),
                    **({"position_share": position_share} if position_share else {}),
                    samples_seen=steps * batch_size)
    record = {"settings": settings, "validation": [], "loss_every_10_steps": [], "train_seconds": 0.0}
    start_step = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        record, start_step = resume_checkpoint(checkpoint, modules={"model": model, "probe": probe,
                                                                    "tower_probe": tower_probe}, optimizer=optimizer,
                                               scheduler=scheduler, settings=settings, log=log)
    losses = []
    probe_hits = {"colour": [], "shape": [], "pair": [], "row": [], "column": [], "readout": [], "relation": [],
                  "attention_loss": [],
                  "value_loss": [],
                  **{f"tower_{name}": [] for name in tower_probe}}
    begin = time.perf_counter() - record["train_seconds"]
    total = tower_steps + steps
    bar = tqdm(range(start_step, total), desc="train step", unit="step", initial=start_step, total=total,
               dynamic_ncols=True)
    for step in bar:
        if step < tower_steps:
            tower_loss = _tower_step(model, processor, tower_probe, data, seed, step, batch_size, grid, probe_hits)
            optimizer_step(tower_loss, optimizer, scheduler, model.parameters(), clip)
            losses.append(tower_loss.item())
            _log_progress(step, total, tower_steps, losses, probe_hits, record, bar)
            continue
        if freeze_tower and model.model.vision_tower.training:
            model.model.vision_tower.requires_grad_(False).eval()
        if turns > 1:
            samples = [make_conversation(seed, "train", step * batch_size + i, turns,
                                         **({"type_weights": type_weights} if type_weights else {}))
                       for i in range(batch_size)]
            batch = encode_conversations(processor, samples, label_text=bool(text_loss),
                                         answer_positions=readout_weight > 0 or attention_weight > 0 or value_weight > 0)
        else:
            samples = [make_sample(seed, "train", step * batch_size + i) for i in range(batch_size)]
            batch = encode_batch(processor, samples, with_answers=True)
            batch.pop("question_mask")
        batch = {k: v.to(device) for k, v in batch.items()}
        positions = batch.pop("answer_positions", None)
        out = model(**batch, output_hidden_states=readout_weight > 0, output_attentions=attention_weight > 0)
        if (attention_weight > 0 or value_weight > 0) and positions is not None:
            loss_terms = evidence_losses(out, batch["input_ids"], positions, samples, data, evidence_layers,
                                         model.config.image_token_id, grid, captured, probe, head_dim,
                                         evidence_heads)
            for name, weight in (("attention", attention_weight), ("value", value_weight)):
                if weight > 0:
                    probe_hits[f"{name}_loss"].append(loss_terms[name].item())
            extra = attention_weight * loss_terms["attention"] + value_weight * loss_terms["value"]
        else:
            extra = 0.0
        loss = out.loss
        if readout_weight > 0:
            rows_b, turns_b = (positions >= 0).nonzero(as_tuple=True)
            states = out.hidden_states[readout_layer][rows_b, positions[rows_b, turns_b]]  # [answers, D]
            targets = torch.tensor([data.readout_targets(samples[b].shapes, samples[b].asked[t], grid)
                                    + (data.comparison_targets(samples[b].shapes, samples[b].asked[t])
                                       if readout_comparisons else [])
                                    for b, t in zip(rows_b.tolist(), turns_b.tolist())], device=device)  # [answers, 8]
            loss, hit_rate = add_probe_losses(loss, readout_weight,
                                              probe["readout"](states).split(readout_sizes, dim=-1), targets)
            probe_hits["readout"].append(hit_rate)
            if readout_relation:
                targets = torch.tensor([data.relation_targets(samples[b].turns[t][0], samples[b].shapes,
                                                              samples[b].asked[t])
                                        for b, t in zip(rows_b.tolist(), turns_b.tolist())], device=device)
                loss, hit_rate = add_probe_losses(loss, readout_weight, probe["relation"](states).split(2, dim=-1),
                                                  targets)
                probe_hits["relation"].append(hit_rate)
        if aux_weight > 0:
            feats = out.image_hidden_states.view(len(samples), num_tokens, -1)
            targets = [patch_labels(s, grid) for s in samples]
            colour_t = torch.stack([t[0] for t in targets]).to(device).flatten()
            shape_t = torch.stack([t[1] for t in targets]).to(device).flatten()
            pair_t = torch.where(colour_t > 0, (colour_t - 1) * len(SHAPES) + shape_t, torch.zeros_like(colour_t))
            for name, target in (("colour", colour_t), ("shape", shape_t), ("pair", pair_t)):
                logits = probe[name](feats).flatten(0, 1)
                loss = loss + aux_weight * torch.nn.functional.cross_entropy(logits, target)
                on_shape = target > 0
                probe_hits[name].append((logits[on_shape].argmax(-1) == target[on_shape]).float().mean().item())
        if position_weight > 0:
            feats = out.image_hidden_states.view(len(samples), num_tokens, -1)
            for name, target in (("row", rows), ("column", columns)):
                logits = probe[name](feats).flatten(0, 1)
                target = target.repeat(len(samples))
                loss = loss + position_weight * torch.nn.functional.cross_entropy(logits, target)
                probe_hits[name].append((logits.argmax(-1) == target).float().mean().item())
        loss = loss + extra
        optimizer_step(loss, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad], clip)
        losses.append(out.loss.item())
        _log_progress(step, total, tower_steps, losses, probe_hits, record, bar)
        if eval_every > 0 and ((step + 1 - tower_steps) % eval_every == 0 or step + 1 == total):
            record["train_seconds"] = round(time.perf_counter() - begin, 1)
            accuracy = evaluate_base(model, processor, val_size, seed, task, split="val")["accuracy"]
            model.train()
            record["validation"].append({"step": step + 1, "train_seconds": record["train_seconds"],
                                         "accuracy": {k: round(v, 4) for k, v in accuracy.items()}})
            log(f"step {step + 1}: validation accuracy {accuracy['all']:.3f} ("
                + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items() if k != "all") + ")")
            if checkpoint is not None:
                save_checkpoint(checkpoint, modules={"model": model, "probe": probe, "tower_probe": tower_probe},
                                optimizer=optimizer,
                                scheduler=scheduler, step=step + 1, record=record, settings=settings)
    train_seconds = time.perf_counter() - begin
    curve = record["loss_every_10_steps"]
    metrics = evaluate_base(model, processor, eval_size, seed, task)
    metrics.update(
        train_seconds=round(train_seconds, 1),
        settings=settings,
        loss_first_10=curve[0]["loss"] if curve else None,
        loss_last_10=curve[-1]["loss"] if curve else None,
        probe_accuracy_last_10={k: sum(v[-10:]) / len(v[-10:]) for k, v in probe_hits.items() if v},
        loss_curve={entry["step"]: entry["loss"] for entry in curve[::3]},
        validation=record["validation"],
    )
    for hook in hooks:
        hook.remove()
    model.config.text_config._attn_implementation = saved_attention  # the saved model runs as it was built
    model.to("cpu")
    with atomic_path(Path(output_dir)) as tmp:  # a kill during the save leaves no half-written model directory
        tmp.mkdir()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / METRICS_FILE, metrics)
    log(format_metrics(metrics))
    return metrics


def add_probe_losses(loss: torch.Tensor, weight: float, head_logits, targets: torch.Tensor):
    """``loss`` plus ``weight`` x the cross-entropy of each probe head that has a target, and the heads' mean hit rate.

    head_logits: one ``[answers, classes_h]`` tensor per head; targets ``[answers, heads]``, -100 where an answer has
    no target for that head. Heads without any target add nothing and are left out of the hit rate (0.0 if none).
    """
    hits = []
    for head, logits in enumerate(head_logits):
        target = targets[:, head]
        if (target >= 0).any():
            loss = loss + weight * torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
            hits.append((logits.argmax(-1) == target)[target >= 0].float().mean().item())
    return loss, (sum(hits) / len(hits) if hits else 0.0)


def evidence_losses(out, input_ids: torch.Tensor, positions: torch.Tensor, samples, data, evidence_layers,
                    image_token_id: int, grid: int, captured: dict, probe, head_dim: int,
                    heads: int = 1) -> dict[str, torch.Tensor]:
    """Attention and value supervision at every turn's answer position (``positions [B, turns]``, -1 = none).

    ``heads=1``: head 0 of each of ``evidence_layers`` looks at the patches of every object the turn asks about, and
    its output (captured before ``o_proj``) must give the first asked object's colour and shape. ``heads=2``: where a
    turn asks about exactly two objects (position and relation questions), head 0 looks at the first and head 1 at
    the second, and each head's output must give its own object's colour, shape, patch row and column (what a
    comparison of the two needs, read apart instead of mixed); the other turns as with ``heads=1``.

    ``attention``: mean over supervised (answer, head) pairs and layers of ``-log`` (the head's attention mass on
    its objects' image rows). ``value``: mean cross-entropy of the linear value probes."""
    from data.media import PALETTE, SHAPES

    rows_b, turns_b = (positions >= 0).nonzero(as_tuple=True)
    device = input_ids.device
    zero = torch.zeros((), device=device)
    terms = {"attention": zero, "value": zero}
    if len(rows_b) == 0:
        return terms
    answers = list(zip(rows_b.tolist(), turns_b.tolist()))
    queries = positions[rows_b, turns_b]  # [answers]
    looks = []  # per answer, per head: the objects it looks at
    for b, t in answers:
        asked = tuple(samples[b].asked[t])
        looks.append([(asked[0],), (asked[1],)] if heads == 2 and len(asked) == 2 else [asked] + [()] * (heads - 1))
    image_rows = [(input_ids[b] == image_token_id).nonzero().flatten() for b in range(input_ids.shape[0])]
    if out.attentions is not None:
        losses = []
        for head in range(heads):
            targets = torch.zeros(len(answers), input_ids.shape[1], dtype=torch.bool, device=device)  # [answers, T]
            for i, (b, t) in enumerate(answers):
                if looks[i][head]:
                    patches = torch.from_numpy(data.object_patches(samples[b].shapes, looks[i][head], grid)).to(device)
                    targets[i, image_rows[b][patches]] = True
            has_target = targets.any(-1)
            if has_target.any():
                for layer in evidence_layers:
                    attention = out.attentions[layer][rows_b, head, queries]  # [answers, T]
                    losses.append(-torch.log((attention * targets).sum(-1)[has_target].float() + 1e-6).mean())
        if losses:
            terms["attention"] = torch.stack(losses).mean()
    if captured:
        losses = []
        cell = data.IMAGE_SIZE // grid
        for head in range(heads):
            if heads == 1:  # the first asked object, colour and shape
                read = [look[0][0] if look[0] else None for look in looks]
                attributes = ("colour", "shape")
            else:
                read = [look[head][0] if len(look[head]) == 1 else None for look in looks]
                attributes = ("colour", "shape", "row", "column")
            keep = torch.tensor([r is not None for r in read], device=device)
            if not keep.any():
                continue
            objects = [samples[b].shapes[r] for (b, _), r in zip(answers, read) if r is not None]
            values = {"colour": [list(PALETTE).index(o.colour) for o in objects],
                      "shape": [SHAPES.index(o.kind) for o in objects],
                      "row": [o.cy // cell for o in objects], "column": [o.cx // cell for o in objects]}
            for layer in evidence_layers:
                output = captured[f"heads{layer}"][rows_b, queries, head * head_dim:(head + 1) * head_dim][keep]
                output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + 1e-6)
                name = f"value{layer}" if heads == 1 else f"value{layer}_head{head}"
                for attribute in attributes:
                    losses.append(torch.nn.functional.cross_entropy(
                        probe[f"{name}_{attribute}"](output), torch.tensor(values[attribute], device=device)))
        if losses:
            terms["value"] = torch.stack(losses).sum() / (len(evidence_layers) * heads)
    captured.clear()
    return terms


def _tower_step(model, processor, tower_probe, data, seed: int, step: int, batch_size: int, grid: int,
                probe_hits: dict) -> torch.Tensor:
    """One step of the tower's pretraining: the summed cross-entropy of the per-patch heads on the selected CLIP
    feature layer (``data.patch_targets``, and each patch's row and column; images of the ``train`` split, indices far
    from the LLaVA training's)."""
    samples = [data.make_sample(seed, "train", (1 << 24) + step * batch_size + i) for i in range(batch_size)]
    device = next(model.parameters()).device
    pixel_values = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    hidden = model.model.vision_tower(pixel_values.to(device), output_hidden_states=True).hidden_states
    features = hidden[model.config.vision_feature_layer][:, 1:]  # [B, grid^2, Dv], CLS dropped as LLaVA does
    patch_index = torch.arange(grid * grid)
    targets = [{**data.patch_targets(s, grid), "row": patch_index // grid, "column": patch_index % grid}
               for s in samples]
    loss = features.new_zeros(())
    for name, head in tower_probe.items():
        target = torch.stack([t[name] for t in targets]).to(device).flatten()
        logits = head(features).flatten(0, 1)
        loss = loss + torch.nn.functional.cross_entropy(logits, target)
        if name in ("row", "column"):
            on_object = torch.ones_like(target, dtype=torch.bool)
        else:  # accuracy on object patches (the background is most patches)
            on_object = torch.stack([t["colour"] for t in targets]).to(device).flatten() > 0
        probe_hits[f"tower_{name}"].append((logits[on_object].argmax(-1) == target[on_object]).float().mean().item())
    return loss


def _log_progress(step: int, total: int, tower_steps: int, losses: list, probe_hits: dict, record: dict, bar) -> None:
    """Every 10 steps: the mean loss and probe accuracies of the last 10 steps to the JSON log and the progress bar."""
    if not ((step + 1) % 10 == 0 or step + 1 == total or step + 1 == tower_steps):
        return
    tower = step < tower_steps
    recent = {k: v for k, v in probe_hits.items() if v and k.startswith("tower_") == tower}
    loss = sum(losses[-10:]) / len(losses[-10:])
    record["loss_every_10_steps"].append({"step": step + 1, "phase": "tower" if tower else "llava", "loss": round(loss, 4),
                                          **{f"probe_{k}": round(sum(v[-10:]) / len(v[-10:]), 3) for k, v in recent.items()}})
    bar.set_postfix({"loss": f"{loss:.3f}", **{f"probe_{k}": f"{sum(v[-10:]) / len(v[-10:]):.2f}" for k, v in recent.items()}})


def format_metrics(metrics: dict) -> str:
    acc, chance = metrics["accuracy"], metrics["chance"]
    lines = [f"held-out exact match ({metrics['eval_size']} questions; trained {metrics.get('train_seconds', '?')} s):",
             f"  {'type':<10}{'accuracy':>10}{'chance (uniform)':>18}{'chance (majority)':>19}"]
    for qtype, c in chance.items():
        lines.append(f"  {qtype:<10}{acc[qtype]:>10.3f}{c['uniform']:>18.3f}{c['majority']:>19.3f}")
    lines.append(f"  {'all':<10}{acc['all']:>10.3f}")
    return "\n".join(lines)


def default_base_path() -> Path:
    """Where :func:`trained_base_dir` keeps the default base (it may not be built yet)."""
    from models.tiny import cache_root

    return cache_root() / f"llava-vqa-v{BASE_VERSION}"


def trained_base_dir(log=print) -> Path:
    """The cached default base (trained with ``DEFAULTS`` on first use)."""
    from models.tiny import cached_model_dir
    from models.tiny.llava import tiny_llava_dir

    def build(tmp: Path) -> None:
        log(f"training the shapes-VQA base into the cache (once; defaults {DEFAULTS})")
        train_base(tiny_llava_dir(), tmp, log=log, **DEFAULTS)

    return cached_model_dir("llava-vqa", BASE_VERSION, build)


# ----------------------------------------------------------------------------- which base a pruning run used


def base_identity(model_path: str | Path) -> dict:
    """``{"base_model", "base_fingerprint"}`` of a base model, stored in every checkpoint and stage file.

    ``base_model``: the absolute path of a local directory (else the hub id as given).
    ``base_fingerprint``: sha256 of ``config.json`` and, per weight file, its name, size and three 1 MiB
    samples (start, middle, end): a copy of the directory matches, a retrained or different model does
    not, and a 7B checkpoint is fingerprinted without reading it whole. None when not a local directory.
    """
    from evaluation.records import WEIGHT_SUFFIXES, digest_weight_samples

    path = Path(model_path)
    if not path.is_dir():
        return {"base_model": str(model_path), "base_fingerprint": None}
    digest = hashlib.sha256()
    config = path / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for file in weights:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        digest_weight_samples(digest, file)
    return {"base_model": str(path.resolve()), "base_fingerprint": digest.hexdigest()}


def base_mismatch(stored: dict, current: dict) -> str | None:
    """Why the base recorded in a checkpoint (``stored``) is not ``current`` (:func:`base_identity`); None if it is.

    Fingerprints decide when both are known (a copied directory is the same base); else the paths.
    """
    old_fp, new_fp = stored.get("base_fingerprint"), current.get("base_fingerprint")
    if old_fp and new_fp:
        same = old_fp == new_fp
    else:
        old, new = stored.get("base_model"), current.get("base_model")
        if old is None:
            return None  # nothing recorded: cannot tell
        old_path, new_path = Path(str(old)), Path(str(new))
        same = str(old) == str(new) or (old_path.exists() and new_path.exists() and old_path.resolve() == new_path.resolve())
    if same:
        return None
    where = "" if str(stored.get("base_model")) != str(current.get("base_model")) else " (same path, different weights)"
    return f"trained on base {stored.get('base_model')!r}, not on {current.get('base_model')!r}{where}"


def load_torch_file(path: Path):
    """``torch.load(path, weights_only=True)`` on CPU; an unusable file is a ``ValueError`` whose text says why in one line.

    Used for checkpoints and stage files: ``weights_only`` unpickles tensors and plain data only, so a
    foreign file cannot run code.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty (0 bytes: its save was interrupted)")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise ValueError(f"not a torch.save file (no zip header; {size} bytes of something else)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every unreadable file is one line
        first = (str(error).strip().splitlines() or [""])[0]
        if "weights_only" in first or "Weights only" in first:
            raise ValueError("holds objects other than tensors and plain data (refused by weights_only loading)") from None
        raise ValueError(f"truncated or corrupt ({type(error).__name__}: {first.split('. ')[0][:100]})") from None
