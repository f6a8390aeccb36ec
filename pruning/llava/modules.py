"""System C: two-stage learned visual-token pruning for LLaVA-1.5, adversarially trained.

    CLIP tower [B, 576, Dv] -> TokenMerger -> [B, 288, Dv] -> projector -> LLM
        with a LayerPruner at layers 10, 20, 31 (vision tokens attend to question tokens,
        then predict keep logits; Gumbel-top-k keeps a fixed fraction)
    -> Discriminator: unpruned (real) vs pruned (fake) LLM hidden states of the text tokens.

The modules here are algorithm only; the hooks that call them sit in fenced branches of
``models/llava/modeling_llava.py``. Hyper-parameters come from ``pruning.llava.config``.

Differentiable selection (``gumbel_topk``)
------------------------------------------
Forward value: the hard 0/1 top-k mask of ``logits + g`` (``g`` i.i.d. Gumbel(0, 1) noise, or
none). Backward: straight-through, through the soft relaxation
``sigmoid((logits + g - t) / temperature)`` where ``t`` (no gradient) is the midpoint between
the k-th and (k+1)-th largest perturbed scores. The relaxation lies in (0, 1), is ~1 for the
selected and ~0 for the rest, and tends to the hard mask as ``temperature -> 0``; its gradient is
non-zero for every finite temperature (largest for the tokens near the selection boundary).
The temperature shapes only the gradient (and ``hard=False`` output): which tokens are picked
depends on the noise, as in Gumbel-softmax. ``noise=False`` is the deterministic hard top-k.

Token merger (stage 1)
----------------------
An importance head scores the N tokens (``simple``: from the features; ``question_aware``: the
features after cross-attention to the question embeddings). Gumbel-top-k picks M centres
(in eval mode: no noise, deterministic). Every token is softly assigned to the centres:
``A = softmax_over_centres(Q K^T / sqrt(d) / temperature)`` with queries from the *tokens* and
keys from the *centres* ``[B, N, M]`` (rows sum to 1: each token spreads unit mass over the
centres). Merged token m is the weighted mean of the tokens assigned to it,
``merged = W^T x`` with ``W = A / A.sum(over tokens)`` (columns sum to 1; computed in log space,
so a centre that receives almost no mass still gets an exact convex combination). The centre
keys are multiplied by the straight-through selection mask (value 1), which carries the
gradient of the merge back to the importance head. Q and K projections start equal, so at
initialisation tokens go to the centres they resemble most (each centre mostly to itself).

Layer pruner (stage 2)
----------------------
Per pruning layer: vision hidden states [B, V, D] attend (multi-head cross-attention) to the
question hidden states [B, Lq, D] of the same layer; an MLP predicts keep logits [B, V].
``keep_mask`` keeps ``keep_count(alive, keep_ratio)`` of the tokens still alive
(``prev_mask``); a token dropped earlier stays dropped (the masks multiply).

Discriminator
-------------
Real = the unpruned model's, fake = the pruned model's hidden states of the *text* tokens (the
question and answer positions, present in both sequences) at ``discriminator_hidden_layer``
(default -1: the final, normed layer), with the text attention mask. Vision positions are
left out: their count differs between the two runs. Attention pooling + masked mean -> MLP -> logit.

Losses
------
``adversarial_losses`` (non-saturating BCE), ``task_loss`` (next-token CE, ignore -100),
``merge_sparsity_loss`` (mean entropy of the soft assignment rows, normalised by log M, in
[0, 1]: low when each token commits to one centre), ``token_budget_loss`` ((mean keep -
target)^2) and ``total_generator_loss`` (the weighted sum, weights from ``LossConfig``).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pruning.common import round_half_up
from pruning.llava.config import (
    DiscriminatorConfig,
    LossConfig,
    MergerConfig,
    PrunerConfig,
    keep_count,
)

# ----------------------------------------------------------------------------- selection


def gumbel_noise(shape: torch.Size | Sequence[int], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """I.i.d. Gumbel(0, 1) samples ``-log(-log U)``, ``U`` uniform in the open interval (0, 1)."""
    tiny = torch.finfo(dtype).tiny
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp_(tiny, 1.0 - torch.finfo(dtype).eps)
    return -torch.log(-torch.log(u))


def _straight_through_topk(
    scores: torch.Tensor, k: torch.Tensor, temperature: float, valid: torch.Tensor | None, hard: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k[b]`` mask per row of ``scores`` [B, N] among ``valid`` [B, N] positions.

    Returns ``(mask [B, N], order [B, N])``: the straight-through mask (hard value, gradient of
    the sigmoid relaxation; the relaxation itself when ``hard=False``) and the descending,
    stable (ties: lower index first) order of the scores with invalid positions last.
    """
    b, n = scores.shape
    s32 = scores.float()
    masked = s32 if valid is None else s32.masked_fill(~valid, float("-inf"))
    with torch.no_grad():
        sorted_scores, order = torch.sort(masked, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=scores.device).expand(b, n))
        hard_mask = (ranks < k[:, None]).float()
        alive = torch.full_like(k, n) if valid is None else valid.sum(-1)
        kth = sorted_scores.gather(-1, (k - 1).clamp(min=0)[:, None])
        nxt = sorted_scores.gather(-1, k.clamp(max=n - 1)[:, None])
        # Boundary between kept and dropped; with nothing left to drop, one unit below the k-th.
        threshold = torch.where((k < alive)[:, None], (kth + nxt) / 2, kth - 1.0)
        threshold = torch.where((k > 0)[:, None], threshold, torch.full_like(threshold, float("inf")))
    soft = torch.sigmoid((s32 - threshold) / temperature)
    if valid is not None:
        soft = soft * valid
    # (soft - soft.detach()) is exactly 0 in value, so the forward value is exactly the 0/1 mask.
    mask = hard_mask + (soft - soft.detach()) if hard else soft
    return mask.to(scores.dtype), order


def gumbel_topk(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    hard: bool = True,
    noise: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable Gumbel-top-k selection.

    Args:
        logits: ``[B, N]`` selection scores.
        k: number of positions selected per row, ``0 <= k <= N``.
        temperature: ``> 0``; sharpness of the relaxation the gradient flows through.
        hard: ``True``: the value is the exact 0/1 mask (straight-through gradient);
            ``False``: the value is the soft relaxation itself.
        noise: add Gumbel noise (sampling); ``False`` is the deterministic top-k.
        generator: RNG for the noise.
    Returns:
        ``mask [B, N]`` (dtype of ``logits``; exactly ``k`` ones per row when ``hard``) and
        ``indices [B, k]`` of the selected positions in ascending position order.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, N], got shape {tuple(logits.shape)}")
    b, n = logits.shape
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, N={n}]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    scores = logits
    if noise:
        scores = logits + gumbel_noise(logits.shape, generator=generator, device=logits.device).to(logits.dtype)
    ks = torch.full((b,), k, dtype=torch.long, device=logits.device)
    mask, order = _straight_through_topk(scores, ks, temperature, None, hard)
    indices = torch.sort(order[:, :k], dim=-1).values
    return mask, indices


def keep_mask(
    logits: torch.Tensor,
    keep_ratio: float,
    temperature: float = 1.0,
    training: bool = False,
    prev_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep mask ``[B, V]`` over vision tokens from keep logits ``[B, V]``.

    Keeps ``keep_count(alive_b, keep_ratio)`` tokens of row b (``alive_b`` = tokens with
    ``prev_mask > 0.5``, all V without ``prev_mask``): round half up, at least one. Training:
    Gumbel-top-k with the straight-through estimator (hard 0/1 value, gradient to ``logits``);
    inference: deterministic hard top-k, no noise, no gradient. The result is multiplied by
    ``prev_mask``, so a token dropped earlier stays dropped (and ``prev_mask``'s own
    straight-through gradient keeps flowing). ``keep_ratio=1`` without ``prev_mask`` keeps all.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} must be in (0, 1]")
    if prev_mask is not None and prev_mask.shape != logits.shape:
        raise ValueError(f"prev_mask shape {tuple(prev_mask.shape)} != logits shape {tuple(logits.shape)}")
    valid = None if prev_mask is None else prev_mask.detach() > 0.5
    alive = [logits.shape[1]] * logits.shape[0] if valid is None else valid.sum(-1).tolist()
    ks = torch.tensor([keep_count(a, keep_ratio) for a in alive], dtype=torch.long, device=logits.device)
    if training:
        scores = logits + gumbel_noise(logits.shape, generator=generator, device=logits.device).to(logits.dtype)
        mask, _ = _straight_through_topk(scores, ks, temperature, valid, hard=True)
    else:
        with torch.no_grad():
            mask, _ = _straight_through_topk(logits.detach(), ks, 1.0, valid, hard=True)
    return mask if prev_mask is None else mask * prev_mask.to(mask.dtype)


# ----------------------------------------------------------------------------- building blocks


def distinctiveness(x: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Parameter-free prior for the importance heads: how unlike the other tokens each token is.

    ``x [B, N, D]``, ``alive [B, N]`` (bool; None: all) -> ``[B, N]``: ``1 - mean_j cos(x_i, x_j)``
    over the alive ``j``, standardised per row over the alive tokens (zero mean, unit std; 0 at
    dead tokens). Large for a token that stands out from the rest (an object on a plain background),
    small for the many look-alike ones: the same intuition as diversity-based selection (DivPrune),
    as a score a learned head can start from and correct. No gradient flows through it.
    """
    with torch.no_grad():
        xn = F.normalize(x.float(), dim=-1)
        w = torch.ones(x.shape[:2], device=x.device) if alive is None else alive.float()
        count = w.sum(-1, keepdim=True).clamp(min=1.0)
        score = 1.0 - (xn @ (xn * w.unsqueeze(-1)).sum(1, keepdim=True).transpose(1, 2)).squeeze(-1) / count
        mean = (score * w).sum(-1, keepdim=True) / count
        std = (((score - mean) ** 2 * w).sum(-1, keepdim=True) / count).sqrt().clamp(min=1e-6)
        return ((score - mean) / std * w).to(x.dtype)


def _masked_fill_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries ``[B, N, d]`` attend to keys/values ``[B, L, d_kv]``.

    ``kv_mask [B, L]`` (1/True = attend) hides padding; a row with no visible key gets a zero
    output (not NaN).
    """

    def __init__(self, d_model: int, num_heads: int, d_kv: int | None = None) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        d_kv = d_model if d_kv is None else d_kv
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_kv, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, d]``, ``ctx [B, L, d_kv]``, ``kv_mask [B, L]`` -> ``[B, N, d]``."""
        b, n, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q(x).view(b, n, h, hd).transpose(1, 2)  # [B, h, N, hd]
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, hd).permute(2, 0, 3, 1, 4)  # 2 x [B, h, L, hd]
        att = q @ k.transpose(-2, -1) / math.sqrt(hd)  # [B, h, N, L]
        if kv_mask is not None:
            visible = kv_mask.bool()[:, None, None, :]
            att = att.masked_fill(~visible, _masked_fill_value(att.dtype))
        y = att.softmax(-1) @ v  # [B, h, N, hd]
        y = y.transpose(1, 2).reshape(b, n, h * hd)
        if kv_mask is not None:
            y = y * kv_mask.bool().any(-1).to(y.dtype)[:, None, None]
        return self.out(y)


class MLP(nn.Module):
    """``Linear -> GELU -> Linear``: ``[..., d_in]`` -> ``[..., d_out]``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# ----------------------------------------------------------------------------- stage 1: merger


class MergerOutput(NamedTuple):
    """What ``TokenMerger.forward`` returns (M = merged tokens)."""

    tokens: torch.Tensor  # [B, M, D] merged features (same space as the input)
    assignment: torch.Tensor  # [B, N, M] soft assignment of tokens to centres; rows sum to 1
    merge_weights: torch.Tensor  # [B, N, M] column-normalised assignment; tokens = merge_weights^T x
    importance_logits: torch.Tensor  # [B, N] importance scores of the tokens
    centre_indices: torch.Tensor  # [B, M] positions of the centres, ascending
    selection_mask: torch.Tensor  # [B, N] straight-through 0/1 centre mask (exactly M ones per row)


class TokenMerger(nn.Module):
    """Learnable merger ``[B, N, D]`` -> exactly ``[B, M, D]`` (see the module docstring).

    Args:
        dim: feature width D (CLIP hidden size for LLaVA-1.5: the merger sits before the projector).
        merger_type: ``"simple"`` or ``"question_aware"``.
        target_merge_tokens: M; ``None``: ``round_half_up(merge_ratio * N)`` at call time.
        merge_ratio: used when ``target_merge_tokens`` is None.
        d_internal: width of the importance head and of the assignment queries/keys.
        num_heads: heads of the question cross-attention (``question_aware``).
        question_dim: width of the question embeddings (default ``dim``).
        prior_scale: initial value of the learnable weight of the ``distinctiveness`` prior added to
            the importance logits (0: none).
    """

    def __init__(
        self,
        dim: int,
        merger_type: str = "simple",
        target_merge_tokens: int | None = 288,
        merge_ratio: float = 0.5,
        d_internal: int = 512,
        num_heads: int = 4,
        question_dim: int | None = None,
        prior_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if merger_type not in ("simple", "question_aware"):
            raise ValueError(f"merger_type={merger_type!r}; allowed: 'simple' | 'question_aware'")
        self.merger_type, self.target_merge_tokens, self.merge_ratio = merger_type, target_merge_tokens, merge_ratio
        self.d_internal = d_internal
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, d_internal)
        if merger_type == "question_aware":
            self.question_norm = nn.LayerNorm(question_dim or dim)
            self.cross_attn = CrossAttention(d_internal, num_heads, d_kv=question_dim or dim)
            self.cross_norm = nn.LayerNorm(d_internal)
        self.importance = MLP(d_internal, d_internal, 1)
        self.prior_scale = nn.Parameter(torch.tensor(float(prior_scale)))
        self.q_proj = nn.Linear(dim, d_internal, bias=False)
        self.k_proj = nn.Linear(dim, d_internal, bias=False)
        with torch.no_grad():  # equal Q/K: assignment starts as feature similarity
            self.k_proj.weight.copy_(self.q_proj.weight)

    @classmethod
    def from_config(cls, dim: int, cfg: MergerConfig, num_input_tokens: int = 576,
                    question_dim: int | None = None) -> "TokenMerger":
        """Merger for a tower with ``num_input_tokens`` tokens (``cfg.resolve_num_tokens`` gives M)."""
        return cls(dim, cfg.merger_type, cfg.resolve_num_tokens(num_input_tokens), cfg.merge_ratio,
                   cfg.merger_d_internal, cfg.merger_num_heads, question_dim, cfg.merger_prior_scale)

    def num_output_tokens(self, num_tokens: int) -> int:
        """M for an input of ``num_tokens`` tokens; raises if M > N."""
        m = self.target_merge_tokens
        if m is None:
            m = min(max(round_half_up(self.merge_ratio * num_tokens), 1), num_tokens)
        if not 1 <= m <= num_tokens:
            raise ValueError(
                f"target_merge_tokens={m} must be in [1, N={num_tokens}]; build the merger with "
                "TokenMerger.from_config(..., num_input_tokens=N) for a tower of another size"
            )
        return m

    def importance_logits(self, x: torch.Tensor, question: torch.Tensor | None = None,
                          question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, D]`` (+ ``question [B, Lq, Dq]``, ``question_mask [B, Lq]``) -> ``[B, N]``."""
        h = self.in_proj(self.norm(x))  # [B, N, d]
        if self.merger_type == "question_aware":
            if question is None:
                raise ValueError("merger_type='question_aware' needs question embeddings [B, Lq, Dq]")
            h = self.cross_norm(h + self.cross_attn(h, self.question_norm(question), question_mask))
        return self.importance(h).squeeze(-1) + self.prior_scale.to(x.dtype) * distinctiveness(x)

    def forward(
        self,
        x: torch.Tensor,
        temperature: float = 1.0,
        question: torch.Tensor | None = None,
        question_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MergerOutput:
        """``x [B, N, D]`` -> ``MergerOutput`` with ``tokens [B, M, D]``.

        Training mode samples the centres (Gumbel noise); eval mode takes the top-M importance
        deterministically. ``temperature`` sharpens both the selection gradient and the assignment.
        """
        b, n, d = x.shape
        m = self.num_output_tokens(n)
        logits = self.importance_logits(x, question, question_mask)  # [B, N]
        sel_mask, idx = gumbel_topk(logits, m, temperature, hard=True, noise=self.training, generator=generator)
        xn = self.norm(x)
        q = self.q_proj(xn)  # [B, N, d]
        centre_gate = sel_mask.gather(1, idx).unsqueeze(-1)  # [B, M, 1], value 1, carries the gradient
        k = self.k_proj(xn.gather(1, idx.unsqueeze(-1).expand(b, m, d))) * centre_gate  # [B, M, d]
        scores = q @ k.transpose(1, 2) / math.sqrt(self.d_internal) / temperature  # [B, N, M]
        log_a = scores.float().log_softmax(dim=-1)  # token -> centres
        assignment = log_a.exp()
        weights = log_a.softmax(dim=1)  # = A / A.sum(over tokens), columns sum to 1
        # Every token's selection gate also scales its own contribution to the merge, with value exactly 1
        # (``1 + (s - s.detach())``): the forward is unchanged, but a token that is *not* a centre now gets
        # a gradient too (d loss / d s_i = <d loss / d merged_j, w_ij x_i>): "more of this token in its merged
        # token would help" raises its importance until it becomes a centre. Without this path only the M
        # selected tokens get a gradient (through the keys), and a useful token that is not selected never does.
        value_gate = 1.0 + (sel_mask - sel_mask.detach())  # [B, N], value 1
        merged = weights.transpose(1, 2).to(x.dtype) @ (x * value_gate.unsqueeze(-1).to(x.dtype))  # [B, M, D]
        return MergerOutput(merged, assignment.to(x.dtype), weights.to(x.dtype), logits, idx, sel_mask)


# ----------------------------------------------------------------------------- stage 2: pruners


class LayerPruner(nn.Module):
    """Pruner head for one LLM layer: vision tokens attend to question tokens -> keep logits.

    Args:
        hidden_size: LLM hidden width D.
        d_internal: internal width of the cross-attention and the predictor.
        num_heads: cross-attention heads.
        prior_scale: initial value of the learnable weight of the ``distinctiveness`` prior added to
            the keep logits (0: none).
    """

    def __init__(self, hidden_size: int, d_internal: int = 512, num_heads: int = 4, prior_scale: float = 0.0) -> None:
        super().__init__()
        self.vision_norm = nn.LayerNorm(hidden_size)
        self.question_norm = nn.LayerNorm(hidden_size)
        self.in_proj = nn.Linear(hidden_size, d_internal)
        self.cross_attn = CrossAttention(d_internal, num_heads, d_kv=hidden_size)
        self.norm = nn.LayerNorm(d_internal)
        self.predictor = MLP(d_internal, d_internal, 1)
        self.prior_scale = nn.Parameter(torch.tensor(float(prior_scale)))

    @classmethod
    def from_config(cls, hidden_size: int, cfg: PrunerConfig) -> "LayerPruner":
        return cls(hidden_size, cfg.pruner_d_internal, cfg.pruner_num_heads, cfg.pruner_prior_scale)

    def forward(self, vision: torch.Tensor, question: torch.Tensor,
                question_mask: torch.Tensor | None = None, alive: torch.Tensor | None = None) -> torch.Tensor:
        """``vision [B, V, D]``, ``question [B, Lq, D]``, ``question_mask [B, Lq]`` -> keep logits ``[B, V]``.

        ``alive [B, V]`` (bool): the tokens still in play, over which the prior compares (None: all).
        """
        h = self.in_proj(self.vision_norm(vision))  # [B, V, d]
        h = self.norm(h + self.cross_attn(h, self.question_norm(question), question_mask))
        return self.predictor(h).squeeze(-1) + self.prior_scale.to(vision.dtype) * distinctiveness(vision, alive)


# ----------------------------------------------------------------------------- discriminator


class Discriminator(nn.Module):
    """Real (unpruned) vs fake (pruned) classifier over a set of token states.

    Per-token MLP, then attention pooling and a masked mean (concatenated), then an MLP head:
    ``[B, N, D]`` (+ ``mask [B, N]``) -> logit ``[B]`` (> 0: "real").
    """

    def __init__(self, dim: int, d_hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.token_mlp = MLP(dim, d_hidden, d_hidden)
        self.pool_score = nn.Linear(d_hidden, 1)
        self.head = MLP(2 * d_hidden, d_hidden, 1)

    @classmethod
    def from_config(cls, dim: int, cfg: DiscriminatorConfig) -> "Discriminator":
        return cls(dim, cfg.discriminator_d_hidden)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``h [B, N, D]``, ``mask [B, N]`` (1 = token present) -> ``[B]``."""
        t = self.token_mlp(self.norm(h))  # [B, N, d]
        s = self.pool_score(t).squeeze(-1)  # [B, N]
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        mask = mask.bool()
        w = s.masked_fill(~mask, _masked_fill_value(s.dtype)).softmax(-1) * mask  # empty row -> zeros
        attn_pool = (w.unsqueeze(-1) * t).sum(1)  # [B, d]
        m = mask.to(t.dtype).unsqueeze(-1)
        mean_pool = (t * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, d]
        return self.head(torch.cat([attn_pool, mean_pool], dim=-1)).squeeze(-1)


# ----------------------------------------------------------------------------- losses


def adversarial_losses(d_real_logits: torch.Tensor, d_fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-saturating GAN losses from discriminator logits ``[B]``.

    ``d_loss = BCE(D(real), 1) + BCE(D(fake), 0)``, ``g_loss = BCE(D(fake), 1)`` (means over B).
    Call with ``D(fake.detach())`` for the discriminator step and ``D(fake)`` for the generator
    step (the discriminator's parameters frozen or its gradients discarded there).
    """
    ones, zeros = torch.ones_like(d_real_logits), torch.zeros_like(d_fake_logits)
    d_loss = (F.binary_cross_entropy_with_logits(d_real_logits, ones)
              + F.binary_cross_entropy_with_logits(d_fake_logits, zeros))
    g_loss = F.binary_cross_entropy_with_logits(d_fake_logits, torch.ones_like(d_fake_logits))
    return d_loss, g_loss


def task_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: ``logits [B, T, V]``, ``labels [B, T]`` -> scalar.

    ``shift=True`` (HF convention, labels aligned with ``input_ids``): position t predicts
    label t+1. Mean over labels != ``ignore_index``; 0 (with a graph) when there are none.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1).to(logits.device)
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def paired_feature_matching(real: torch.Tensor, fake: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Relative squared distance between the pruned (``fake``) and unpruned (``real``) hidden states of the same
    prompts at ``rows`` (the answer rows): ``sum ||fake - real||^2 / sum ||real||^2``, ``[B, T, D]`` x2, ``[B, T]`` ->
    scalar; 0 (with a graph) when no row is selected.

    The paired signal a discriminator only approximates: it compares each pruned state with its own unpruned
    counterpart rather than with the distribution of unpruned states (an addition, ``feature_match_weight``)."""
    rows = rows.bool()
    if not rows.any():
        return fake.sum() * 0.0
    real_rows, fake_rows = real[rows].float(), fake[rows].float()
    return (fake_rows - real_rows.detach()).pow(2).sum() / real_rows.detach().pow(2).sum().clamp(min=1e-12)


def answer_attention_teacher(attentions: Sequence[torch.Tensor], rows: torch.Tensor,
                             image_mask: torch.Tensor) -> torch.Tensor:
    """What the unpruned model's answer rows look at: ``[B, N]`` attention over each prompt's N image tokens.

    ``attentions``: per layer ``[B, H, T, T]`` softmax attention of the unpruned pass (eager attention,
    ``output_attentions=True``); ``rows [B, T]``: the answer rows (:func:`answer_position_mask`); ``image_mask
    [B, T]``: the image placeholders, N per row. Mean over layers, heads and answer rows, renormalised over the image
    tokens (each row sums to 1). The teacher of :func:`attention_distillation`; no gradient."""
    with torch.no_grad():
        rows_f = rows.float()
        mean = torch.stack([a.float().mean(1) for a in attentions]).mean(0)  # [B, T, T]
        answer = (mean * rows_f[..., None]).sum(1) / rows_f.sum(1, keepdim=True).clamp(min=1.0)  # [B, T]
        n = int(image_mask[0].sum())
        vision = answer[image_mask.bool()].view(answer.shape[0], n)  # [B, N]
        return vision / vision.sum(-1, keepdim=True).clamp(min=1e-12)


def merged_teacher(teacher: torch.Tensor, assignment: torch.Tensor, centre_indices: torch.Tensor) -> torch.Tensor:
    """The teacher of the merged tokens, at their centres' positions: ``[B, N]`` -> ``[B, N]``.

    Merged token m carries ``sum_i assignment[i, m] * teacher[i]`` (``assignment [B, N, M]``, rows sum to 1, so the
    total is kept), placed at ``centre_indices [B, M]``; every other position gets 0 (no token there after stage 1)."""
    mass = (assignment.float().transpose(1, 2) @ teacher.float()[..., None]).squeeze(-1)  # [B, M]
    return torch.zeros_like(teacher, dtype=torch.float32).scatter(1, centre_indices, mass)


def attention_distillation(logits: torch.Tensor, teacher: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise KL ``KL(p || softmax(logits))`` over the alive tokens, mean over B: ``[B, N]`` x2 (+ ``alive [B, N]``
    bool) -> scalar.

    ``p`` is ``teacher`` restricted to the alive tokens and renormalised. The selection scores learn to rank tokens
    as the unpruned model's answer attends to them (an addition, ``attention_distill_weight``): a dense,
    per-token signal, where the task loss reaches a score only through a straight-through top-k."""
    logits, teacher = logits.float(), teacher.float().detach()
    if alive is not None:
        alive = alive.bool()
        teacher = teacher * alive
        logits = logits.masked_fill(~alive, -1e4)  # finite: 0 * log q stays 0 at dead tokens
    p = teacher / teacher.sum(-1, keepdim=True).clamp(min=1e-12)
    log_q = logits.log_softmax(-1)
    return (p * (p.clamp(min=1e-12).log() - log_q)).sum(-1).mean()


def merge_sparsity_loss(assignment: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy of the assignment rows, normalised by ``log M``: ``[B, N, M]`` -> scalar in [0, 1].

    0 when every token goes to a single centre (hard, sparse merge), 1 when spread uniformly.
    ``token_mask [B, N]`` excludes tokens from the mean.
    """
    m = assignment.shape[-1]
    if m <= 1:
        return assignment.sum() * 0.0
    a = assignment.float()
    ent = -(a * a.clamp(min=1e-12).log()).sum(-1) / math.log(m)  # [B, N]
    if token_mask is None:
        return ent.mean()
    w = token_mask.to(ent.dtype)
    return (ent * w).sum() / w.sum().clamp(min=1.0)


def token_budget_loss(masks: Sequence[torch.Tensor], target_ratios: Sequence[float]) -> torch.Tensor:
    """Mean over layers of ``mean_B (mean_V mask - target)^2``; ``masks`` are ``[B, V]`` keep masks.

    ``target_ratios`` are fractions of all V positions, i.e. cumulative (for per-layer keep
    ratios r_1, r_2, ...: r_1, r_1 r_2, ...). With hard straight-through masks of exact counts
    the value is ~0 (a guard); it matters for soft masks (``hard=False``).
    """
    if len(masks) != len(target_ratios) or not masks:
        raise ValueError(f"need one target per mask, got {len(masks)} masks and {len(target_ratios)} targets")
    terms = [((mk.float().mean(-1) - t) ** 2).mean() for mk, t in zip(masks, target_ratios)]
    return torch.stack(terms).mean()


_LOSS_WEIGHTS = {
    "adv": "adv_loss_weight",
    "feature_match": "feature_match_weight",
    "attention_distill": "attention_distill_weight",
    "task": "task_loss_weight",
    "merge_sparsity": "merge_sparsity_weight",
    "budget": "budget_loss_weight",
}


def total_generator_loss(parts: Mapping[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """Weighted sum of the generator (merger + pruners) loss terms.

    ``parts`` keys: ``adv`` (the ``g_loss``), ``task``, ``merge_sparsity``, ``budget``; a
    missing key contributes nothing, an unknown one raises ``KeyError``.
    """
    unknown = set(parts) - set(_LOSS_WEIGHTS)
    if unknown:
        raise KeyError(f"unknown loss terms {sorted(unknown)}; allowed: {', '.join(_LOSS_WEIGHTS)}")
    if not parts:
        raise ValueError("no loss terms given")
    return sum(getattr(cfg, _LOSS_WEIGHTS[name]) * value for name, value in parts.items())


def answer_position_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the rows whose hidden state predicts a supervised (answer or EOS) token, ``labels[:, t + 1] != -100``.

    What the discriminator compares. These are the states the answer is read from; on every
    other text row (the question, the template) the pruned model's states differ from the
    unpruned ones mostly in how much background they averaged over, and a discriminator fed
    those rows rewards keeping look-alike background tokens (measured: held-out accuracy of the
    tiny model fell from 0.66 to 0.44 in 200 steps with ``task_loss_weight=0`` and all text rows).
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


__all__ = [
    "answer_attention_teacher",
    "answer_position_mask",
    "attention_distillation",
    "CrossAttention",
    "Discriminator",
    "LayerPruner",
    "MergerOutput",
    "TokenMerger",
    "adversarial_losses",
    "gumbel_noise",
    "gumbel_topk",
    "keep_mask",
    "merge_sparsity_loss",
    "merged_teacher",
    "task_loss",
    "token_budget_loss",
    "total_generator_loss",
]
