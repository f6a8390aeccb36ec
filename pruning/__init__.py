"""Pruning algorithms and the state objects the forks' fences call, one subpackage per system.

* ``pruning.edit``: system A, reference-token reuse in Qwen-Image-Edit (``reference_reuse``).
* ``pruning.video``: system B, PruneVid on Qwen2.5-VL (``prunevid``: stages 1-2; ``dpc_knn``: the
  clustering; ``runtime``: attach/detach, the per-generation state and KV-cache compression).
* ``pruning.llava``: system C, learned merger + pruner heads for LLaVA-1.5 (``config``: validated
  dataclasses; ``modules``: merger, pruner heads, discriminator, losses; ``runtime``: attach / detach
  and the per-call state; ``baselines``: training-free selectors and their token budgets).

Generated tasks and media live in ``data/``, metrics and FLOP models in ``evaluation/``.
"""
