"""A dense, whole-tensor reference of WIDEN written from the contract in docs/widen.md.

Independent of ``streammerge.methods``: nothing is imported from the engine. Every tensor is held whole in
memory; the result is float32.

* 2-D Linear weights (and an untied ``lm_head``): one column per input feature, statistics over dim 0.
* Embeddings (``embedding_names``): transposed first, so one column per token (a stored row).
* Tied embeddings: the head is not merged; when the checkpoint stores it, it becomes the merged embedding.
* 1-D tensors: raw ``|Δ|`` significance, softmax across models, float64 mean threshold, no ½.
* Excluded tensors (``re.match``) keep the base value.

Column statistics in float64 (``ssb = Σb²``, ``ssm = Σm²``, ``dot = Σm·b``); divergences ``|√ssm − √ssb|``
and ``1 − dot/√(ssm·ssb)``; stable ranking within each model, NaN last, ties by column index; ``σ = rank/n`` in
float32; softmax across models; ``s`` where ``2·rank > t·(n−1)`` (decided exactly); ``w = ½(S_mag + S_dir)``;
``merged = B + ((Δ₁w₁ + Δ₂w₂) + Δ₃w₃)`` in float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

EMBEDDING_NAMES: tuple[str, ...] = ("model.embed_tokens.weight",)
HEAD_NAME = "lm_head.weight"


def ranks(divergence: Sequence[float]) -> list[int]:
    """Rank of every column in a stable ascending sort: NaN after every number, ties by lower index first."""
    def key(j: int) -> tuple[bool, float, int]:
        v = divergence[j]
        return (math.isnan(v), 0.0 if math.isnan(v) else v, j)

    order = sorted(range(len(divergence)), key=key)
    rank = [0] * len(order)
    for position, j in enumerate(order):
        rank[j] = position
    return rank


def importance(rank_rows: list[list[int]], t: float, s: float) -> Tensor:
    """Scores (N, n) float32 from per-model ranks: softmax of σ = rank/n across models, ``s`` above the mean."""
    n = len(rank_rows[0])
    sigma = torch.tensor(rank_rows, dtype=torch.float32) / n
    score = torch.softmax(sigma, dim=0)
    above = torch.tensor([[2 * r > t * (n - 1) for r in row] for row in rank_rows])
    return torch.where(above, torch.tensor(s, dtype=torch.float32), score)


def weighted_sum(base: Tensor, models: Sequence[Tensor], weights: Iterable[Tensor]) -> Tensor:
    """``B + ((Δ₁w₁ + Δ₂w₂) + ...)`` in float32, left to right."""
    acc = None
    for m, w in zip(models, weights):
        term = (m - base) * w
        acc = term if acc is None else acc + term
    return base + acc


def column_weights(base: Tensor, models: Sequence[Tensor], t: float, s: float) -> Tensor:
    """WIDEN weights (N, n) for a 2-D tensor whose columns are ``base[:, j]``."""
    b = base.to(torch.float64)
    ssb = (b * b).sum(dim=0).tolist()
    magnitude, direction = [], []
    for m in models:
        m64 = m.to(torch.float64)
        ssm = (m64 * m64).sum(dim=0).tolist()
        dot = (m64 * b).sum(dim=0).tolist()
        magnitude.append(ranks([abs(math.sqrt(x) - math.sqrt(y)) for x, y in zip(ssm, ssb)]))
        direction.append(ranks([_direction(d, x, y) for d, x, y in zip(dot, ssm, ssb)]))
    return (importance(magnitude, t, s) + importance(direction, t, s)) * 0.5


def _direction(dot: float, ssm: float, ssb: float) -> float:
    denominator = math.sqrt(ssm * ssb)
    return float("nan") if denominator == 0 else 1.0 - dot / denominator  # 0/0 -> NaN (zero column)


def merge_matrix(base: Tensor, models: Sequence[Tensor], t: float, s: float) -> Tensor:
    """Linear rule: columns are input features (dim 1), weights broadcast down each column."""
    w = column_weights(base, models, t, s)
    return weighted_sum(base, models, [row[None, :] for row in w])


def merge_embedding(base: Tensor, models: Sequence[Tensor], t: float, s: float) -> Tensor:
    """Transposed rule: each stored row (token) is a column."""
    return merge_matrix(base.T, [m.T for m in models], t, s).T.contiguous()


def merge_vector(base: Tensor, models: Sequence[Tensor], t: float, s: float) -> Tensor:
    """1-D rule: significance is raw |Δ|; softmax across models; ``s`` where |Δ| > t·mean (float64)."""
    sig = torch.stack([(m - base).abs() for m in models])
    score = torch.softmax(sig, dim=0)
    sig64 = sig.to(torch.float64)
    above = sig64 > t * sig64.mean(dim=1, keepdim=True)
    score = torch.where(above, torch.tensor(s, dtype=torch.float32), score)
    return weighted_sum(base, models, list(score))


def widen_reference(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    t: float = 1.0,
    s: float = 1.0,
    embedding_names: Iterable[str] = EMBEDDING_NAMES,
    tied: bool = False,
    exclude: Iterable[str] = (),
) -> dict[str, Tensor]:
    """The merged state dict (float32) of ``models`` onto ``base``."""
    embeddings = set(embedding_names)
    patterns = [re.compile(p) for p in exclude]
    out: dict[str, Tensor] = {}
    for name, b in base.items():
        if tied and name == HEAD_NAME:
            continue  # follows the merged embedding, below
        b32 = b.to(torch.float32)
        ms = [m[name].to(torch.float32) for m in models]
        if any(p.match(name) for p in patterns):
            out[name] = b32.clone()
        elif b32.dim() == 1:
            out[name] = merge_vector(b32, ms, t, s)
        elif b32.dim() == 2:
            rule = merge_embedding if name in embeddings else merge_matrix
            out[name] = rule(b32, ms, t, s)
        else:
            raise ValueError(f"WIDEN has no rule for {name} {tuple(b32.shape)}")
    if tied and HEAD_NAME in base:
        embedding = next(n for n in base if n in embeddings)
        out[HEAD_NAME] = out[embedding].clone()
    return out
