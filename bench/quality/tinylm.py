"""A tiny byte-level Qwen2 (transformers' ``Qwen2ForCausalLM``): build, train, save, load and score it.

Tokens are ByT5's: 0 = ``<pad>`` (also the start token of every sequence), 1 = ``</s>``, 2 = ``<unk>``,
3 + b for byte b; the vocabulary is exactly 259. Each saved folder holds a ``ByT5Tokenizer(extra_ids=0)``, so
``AutoTokenizer.from_pretrained`` gives the same ids.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import ByT5Tokenizer, Qwen2Config, Qwen2ForCausalLM

START, EOS, OFFSET, VOCAB = 0, 1, 3, 259
IGNORE = -100


@dataclass(frozen=True)
class Size:
    """The model's shape."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    context: int


SIZES = {
    "smoke": Size(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2, context=128),
    "default": Size(hidden=128, layers=4, intermediate=384, heads=4, kv_heads=2, context=256),
}


def new_model(size: Size, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised model of ``size`` (float32, tied embedding and head)."""
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.context, tie_word_embeddings=True, bos_token_id=START, eos_token_id=EOS,
        pad_token_id=START, use_cache=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).float()


def save(model: Qwen2ForCausalLM, path: Path) -> None:
    """``save_pretrained`` (safetensors, config.json, generation_config.json) plus the byte tokenizer."""
    model.save_pretrained(path)
    ByT5Tokenizer(extra_ids=0).save_pretrained(path)


def load(path: Path) -> Qwen2ForCausalLM:
    """A saved (or merged) folder, as float32, in eval mode."""
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def encode(text: bytes | str) -> list[int]:
    """Token ids of ``text``'s UTF-8 bytes (no start or end token)."""
    data = text.encode() if isinstance(text, str) else text
    return [b + OFFSET for b in data]


# ----------------------------------------------------------------------------------------------- batches
def random_windows(stream: np.ndarray, rows: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """``rows`` windows of ``length`` bytes at random offsets of ``stream``, each after a start token."""
    starts = rng.integers(0, stream.size - length, size=rows)
    ids = np.stack([stream[s:s + length] for s in starts]).astype(np.int64) + OFFSET
    return torch.cat([torch.full((rows, 1), START), torch.from_numpy(ids)], dim=1)


def fixed_windows(stream: np.ndarray, rows: int, length: int) -> torch.Tensor:
    """``rows`` windows of ``length`` bytes at evenly spaced offsets (the evaluation set: the same every run)."""
    if stream.size <= length:
        raise ValueError(f"held-out stream of {stream.size} bytes is shorter than a {length}-byte window")
    starts = np.linspace(0, stream.size - length - 1, rows).astype(np.int64)
    ids = np.stack([stream[s:s + length] for s in starts]).astype(np.int64) + OFFSET
    return torch.cat([torch.full((rows, 1), START), torch.from_numpy(ids)], dim=1)


def lm_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs and labels for next-byte prediction (the start token is never a target)."""
    labels = ids.clone()
    labels[:, 0] = IGNORE
    return {"input_ids": ids, "labels": labels}


def packed_task_batch(examples: list[tuple[str, str, str]], rows: int, length: int,
                      rng: random.Random) -> dict[str, torch.Tensor]:
    """``rows`` sequences of ``length`` tokens, each packed with ``start prompt answer </s>`` examples drawn from
    ``examples``; only the answer bytes and ``</s>`` are targets (the prompt is context, as in instruction tuning)."""
    ids = torch.full((rows, length), START)
    labels = torch.full((rows, length), IGNORE)
    for r in range(rows):
        pos = 0
        while True:
            _, prompt, answer = examples[rng.randrange(len(examples))]
            p, a = [START, *encode(prompt)], [*encode(answer), EOS]
            if pos + len(p) + len(a) > length:
                break
            ids[r, pos:pos + len(p) + len(a)] = torch.tensor(p + a)
            labels[r, pos + len(p):pos + len(p) + len(a)] = torch.tensor(a)
            pos += len(p) + len(a)
    # the model shifts labels by one itself: label[t] is predicted from position t-1
    return {"input_ids": ids, "labels": labels}


# ----------------------------------------------------------------------------------------------- training
def train(model: Qwen2ForCausalLM, next_batch: Callable[[], dict[str, torch.Tensor]], steps: int, lr: float,
          warmup: int, weight_decay: float, seed: int, label: str, optimizer: str = "adamw") -> list[float]:
    """AdamW (betas 0.9/0.95; ``optimizer="sgd"``: SGD with momentum 0.9), linear warm-up then cosine decay to 10%
    of ``lr``, gradients clipped at 1. Returns the loss of every step."""
    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model(**next_batch()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step == steps - 1 or (step + 1) % max(1, steps // 5) == 0:
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"[quality] {label}: step {step + 1}/{steps} loss {recent:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------- scores
@torch.no_grad()
def bits_per_byte(model: Qwen2ForCausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-byte cross-entropy over every byte of ``windows`` (after the start token), in bits per byte."""
    total, count = 0.0, 0
    for i in range(0, windows.size(0), batch):
        ids = windows[i:i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / count / math.log(2)


@torch.no_grad()
def task_scores(model: Qwen2ForCausalLM, examples: list[tuple[str, str, str]], batch: int = 64) -> dict:
    """Exact match of greedy decoding on ``examples``, overall and per task, and the answers' bits per byte.

    An answer is an exact match when greedy decoding after the prompt yields the answer's bytes, then ``</s>``. That
    is decided exactly by one teacher-forced pass: greedy decoding reproduces the answer if and only if the argmax
    at every answer position (and at the ``</s>``) is the answer's token.
    """
    hits: dict[str, list[bool]] = {}
    nll_sum, nll_count = 0.0, 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        seqs = [([START, *encode(p)], [*encode(a), EOS]) for _, p, a in chunk]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(chunk), width), START)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (p, a) in enumerate(seqs):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            mask[r, :len(p) + len(a)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for r, ((task, _, _), (p, a)) in enumerate(zip(chunk, seqs)):
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1)  # positions whose next token is an answer token
            target = torch.tensor(a)
            hits.setdefault(task, []).append(bool((logits[r, pos].argmax(-1) == target).all()))
            nll_sum -= float(logp[r, pos, target].sum())
            nll_count += len(a)
    every = [h for v in hits.values() for h in v]
    return {"exact_match": sum(every) / len(every),
            "per_task": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
            "answer_bits_per_byte": nll_sum / nll_count / math.log(2)}
