"""What each tensor gets, decided once from the headers: its rule, its dtype policy and its input sources.

Before any tensor is classified the inputs are checked: the models must be homologous with the base (names,
shapes, architectures, tying), and quantized storage (FP8 and other sub-byte float dtypes, scale/absmax
companions, a ``quantization_config``) is refused with what to do, because merging quantized codes as if they were
weights gives garbage. Each tensor then gets:

- a **rule** (matrix, embedding, vector, n-D tensor, copy of the base, copy of the merged embedding for a tied
  head), from its name, shape, dtype and the user's ``--exclude`` and ``--embedding``;
- a **kind** (the dtype policy): ``float`` tensors are merged (or, excluded, copied through float32 into the
  output dtype); ``integer`` and ``bool`` tensors are copied from the base byte for byte;
- its **sources**: the base's first, then each model's, from which the reader and the runner take rows.

Everything after this reads these decisions; nothing decides them again.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import IncompatibleModelsError, PlanError
from .formats.checkpoint import Checkpoint, Located
from .methods import Method, Rule, TensorTask
from .recipe import DERIVED_BUFFERS, HEAD_NAMES, TOKEN_EMBEDDINGS, Recipe
from .sources import InputSource, StoredSource

#: safetensors dtypes that only hold quantized codes
QUANTIZED_DTYPES = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})
#: names of tensors that only exist beside quantized weights (FP8 block scales, bitsandbytes, GPTQ/AWQ)
_COMPANION = re.compile(
    r"(\.weight_scale(_inv)?|\.input_scale|\.[kvq]_scale|\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map|"
    r"\.qweight|\.qzeros|\.SCB|\.weight_format)$|\.quant_state\."
)

_DIGITS = re.compile(r"(\d+)")


class Kind(str, Enum):
    """A tensor's dtype policy."""

    FLOAT = "float"  # merged by the method (or, excluded, copied through float32 into the output dtype)
    INTEGER = "integer"  # copied from the base, bytes as stored
    BOOL = "bool"  # copied from the base, bytes as stored


@dataclass(frozen=True)
class TensorClass:
    """The decisions for one output tensor (before any size is chosen)."""

    name: str
    shape: tuple[int, ...]
    rule: Rule
    kind: Kind
    out_dtype: str
    sources: tuple[InputSource, ...]  # base first, then each model; the base only for a copy; none for a tied head
    copy_of: str | None = None  # for TIED_COPY: the tensor whose merged output bytes become this one
    kept_because: str | None = None  # for COPY_BASE: "--exclude", "derived buffer", "empty" or "not a float"


def classify(recipe: Recipe, method: Method, base: Checkpoint, models: list[Checkpoint], out_dtype: str | None,
             tile: int) -> list[TensorClass]:
    """Every output tensor's rule, kind and sources, in :func:`in_natural_order`; raises (naming every problem) if some
    tensor cannot be merged as asked."""
    refuse_quantized([base, *models])
    excludes = _compile_excludes(recipe.exclude)

    def from_base(name: str) -> str | None:
        """Why the output keeps the base's value whatever the models hold (they need not have it), or None."""
        return "--exclude" if any(rx.match(name) for rx in excludes) else \
            "derived buffer" if is_derived_buffer(name) else None

    head = check_homologous(base, models, lambda name: from_base(name) is not None)
    embeddings = set(recipe.embeddings)
    out: list[TensorClass] = []
    problems: list[str] = []
    for name, loc in in_natural_order(base):
        info = loc.info
        kind = Kind.FLOAT if info.dtype.is_float else (Kind.BOOL if info.dtype.name == "BOOL" else Kind.INTEGER)
        dtype = out_dtype if (out_dtype and kind is Kind.FLOAT) else info.dtype.name
        if head is not None and name == head[0]:
            out.append(TensorClass(name, info.shape, Rule.TIED_COPY, kind, dtype, (), head[1]))
            continue
        why = from_base(name) or ("not a float" if kind is not Kind.FLOAT else "empty" if info.numel == 0 else None)
        if why:  # empty: shape [0] or [0, n], which passes through
            out.append(TensorClass(name, info.shape, Rule.COPY_BASE, kind, dtype, (StoredSource(loc),), None, why))
            continue
        if len(info.shape) <= 1:
            rule = Rule.VECTOR
        elif len(info.shape) == 2:
            rule = Rule.EMBEDDING if name in embeddings else Rule.MATRIX
        else:
            rule = Rule.TENSOR
        why = method.rule_error(TensorTask(name, info.shape, rule, tile))
        if why:
            problems.append(f"{name} {list(info.shape)}: {why}")
        for k, m in enumerate(models, 1):
            if not m.tensors[name].info.dtype.is_float:
                problems.append(f"{name}: model {k} stores it as {m.tensors[name].info.dtype.name}, not a float")
        sources = (StoredSource(loc), *(StoredSource(m.tensors[name]) for m in models))
        out.append(TensorClass(name, info.shape, rule, kind, dtype, sources))
    names = list(dict.fromkeys(name for ckpt in (base, *models) for name in ckpt.tensors))
    messages = unmatched_excludes(recipe.exclude, excludes, names)
    messages += bad_embedding_names(recipe.embedding_names or (), base)
    if problems:
        messages.append(
            f"{method.name} cannot merge {len(problems)} tensor(s):\n  " + "\n  ".join(problems[:10])
            + "\nexclude them (they keep the base value) with --exclude REGEX"
        )
    if messages:
        raise PlanError("\n".join(messages))
    return out


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key putting ``layers.2`` before ``layers.10`` (digit runs compare as numbers)."""
    return tuple(int(part) if k % 2 else part for k, part in enumerate(_DIGITS.split(name)))


def in_natural_order(ckpt: Checkpoint) -> list[tuple[str, Located]]:
    """The order tensors are merged and written in: the checkpoint's shards in order, and within a shard by name
    with layer numbers sorted as numbers (``embed_tokens``, ``layers.0`` … ``layers.27``, ``norm``), which is how
    the progress display walks through the model and how tensors are grouped into output shards."""
    shard_order = {path: k for k, path in enumerate(dict.fromkeys(loc.shard for loc in ckpt.tensors.values()))}
    return sorted(ckpt.tensors.items(), key=lambda item: (shard_order[item[1].shard], natural_key(item[0])))


def quantization_evidence(ckpt: Checkpoint) -> str | None:
    """Why ``ckpt`` looks quantized (a config entry, a dtype, a companion tensor), or None."""
    for config in (ckpt.config, ckpt.config.get("text_config")):
        if isinstance(config, dict) and isinstance(config.get("quantization_config"), dict):
            method = config["quantization_config"].get("quant_method", "unnamed")
            return f"its config.json declares a quantization_config (quant_method {method!r})"
    for name, loc in ckpt.tensors.items():
        if loc.info.dtype.name in QUANTIZED_DTYPES:
            return f"tensor {name} is stored as {loc.info.dtype.name}"
    for name, loc in ckpt.tensors.items():
        if _COMPANION.search(name):
            return f"tensor {name} is a quantization companion (scales or quantization state)"
        for suffix in ("_scale", "_scale_inv"):  # X_scale beside a stored X
            if name.endswith(suffix) and name[: -len(suffix)] in ckpt.tensors:
                return f"tensor {name} holds the scales of {name[: -len(suffix)]}"
    return None


def refuse_quantized(checkpoints: list[Checkpoint]) -> None:
    """Refuse quantized inputs before anything is written, naming the folder and the evidence."""
    for k, ckpt in enumerate(checkpoints):
        evidence = quantization_evidence(ckpt)
        if evidence:
            who = "the base" if k == 0 else f"model {k}"
            raise IncompatibleModelsError(
                f"{who} ({ckpt.folder}) is quantized: {evidence}. streammerge merges floating-point weights, and "
                "merging quantized codes as if they were weights gives a broken model. Merge the unquantized "
                "(bfloat16/float16) release of the same model, or dequantize this one first and save it as "
                "bfloat16 safetensors"
            )


def _compile_excludes(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            glob = (f"; patterns are regular expressions, not shell globs: write {p.replace('*', '.*')!r}"
                    if "*" in p else "")
            raise PlanError(f"--exclude {p!r} is not a valid regular expression: {exc}{glob}") from None
    return out


def unmatched_excludes(patterns: tuple[str, ...], compiled: list[re.Pattern[str]], names: list[str]) -> list[str]:
    """A problem for each ``--exclude`` pattern that matches no tensor name, with the nearest pattern that would:
    patterns match at the start of the name (``re.match``), so a part in the middle needs ``.*``."""
    out = []
    for text, rx in zip(patterns, compiled):
        if any(rx.match(n) for n in names):
            continue
        inside = next((n for n in names if rx.search(n)), None)
        if inside is not None:
            hint = (f"patterns match from the start of the name, and {text!r} only occurs inside names such as "
                    f"{inside}: write --exclude '.*{text}'")
        else:
            near = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
            hint = f"did you mean --exclude '{re.escape(near[0])}'?" if near else \
                f"tensor names look like {names[0]} (streammerge inspect FOLDER lists them)" if names else ""
        out.append(f"--exclude {text!r} matches no tensor" + (f": {hint}" if hint else ""))
    return out


def bad_embedding_names(given: tuple[str, ...], base: Checkpoint) -> list[str]:
    """A problem for each ``--embedding`` name that is not a 2-D tensor of the base, with the nearest name that is
    (a name that matches nothing would silently turn the real embedding into an ordinary matrix)."""
    out = []
    matrices = [n for n, loc in base.tensors.items() if len(loc.info.shape) == 2]
    for name in given:
        loc = base.tensors.get(name)
        if loc is not None and len(loc.info.shape) == 2:
            continue
        if loc is not None:
            out.append(f"--embedding {name!r} is a {len(loc.info.shape)}-D tensor; embeddings are 2-D (one row per "
                       "token or position)")
            continue
        near = difflib.get_close_matches(name, matrices, n=1, cutoff=0.5)
        out.append(f"--embedding {name!r} is not a tensor of the base" + (f": did you mean {near[0]!r}?" if near else
                   " (streammerge inspect FOLDER lists them)"))
    return out


def is_derived_buffer(name: str) -> bool:
    """Whether ``name`` is a non-trainable buffer computed at load time (see ``DERIVED_BUFFERS``)."""
    return any(re.fullmatch(p, name) for p in DERIVED_BUFFERS)


def check_homologous(base: Checkpoint, models: list[Checkpoint],
                     from_base: Callable[[str], bool] = lambda name: False) -> tuple[str, str] | None:
    """Raise unless every model matches the base; return (head, embedding) when a tied head is stored. Tensors
    for which ``from_base`` is true keep the base's value: a model may lack them, hold them with another shape, or
    hold them when the base does not (then the output does not have them either)."""
    head_name = next((h for h in HEAD_NAMES if h in base.tensors), HEAD_NAMES[0])
    tied = base.tied(head_name)
    for k, m in enumerate(models, 1):
        who = f"model {k} ({m.folder})"
        if base.model_type and m.model_type and base.model_type != m.model_type:
            raise IncompatibleModelsError(
                f"{who} is a {m.model_type!r} model but the base ({base.folder}) is {base.model_type!r}"
            )
        if base.architectures and m.architectures and base.architectures != m.architectures:
            raise IncompatibleModelsError(
                f"{who} has architectures {m.architectures} but the base has {base.architectures}"
            )
        if m.tied(head_name) != tied:
            raise IncompatibleModelsError(
                f"{who} {'ties' if m.tied(head_name) else 'does not tie'} its output head to the embedding but the "
                f"base {'does' if tied else 'does not'}. streammerge cannot yet merge tied with untied checkpoints, "
                "and --exclude does not change that. What works: save each tied checkpoint untied and merge those "
                "copies (with transformers: load it, set model.config.tie_word_embeddings = False, set "
                "model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone()), "
                "then model.save_pretrained(NEW_FOLDER)); or leave out the models that tie differently from the base"
            )
        skip = {head_name} if tied else set()
        missing = sorted(n for n in set(base.tensors) - set(m.tensors) - skip if not from_base(n))
        extra = sorted(n for n in set(m.tensors) - set(base.tensors) - skip if not from_base(n))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} of the base's tensors (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} tensor{'s' if len(extra) != 1 else ''} the base lacks "
                             f"(e.g. {', '.join(extra[:3])})")
            raise IncompatibleModelsError(f"{who} {' and '.join(parts)}: the models are not homologous")
        for name, loc in base.tensors.items():
            other = m.tensors.get(name)
            if other is None or from_base(name):
                continue
            if other.info.shape != loc.info.shape:
                hint = ""
                if name in TOKEN_EMBEDDINGS or name in HEAD_NAMES:
                    hint = " (vocabulary sizes differ: resize the embeddings to one vocabulary first)"
                raise IncompatibleModelsError(
                    f"tensor {name}: shape {list(other.info.shape)} in {who} but {list(loc.info.shape)} in the base"
                    + hint
                )
    if tied and head_name in base.tensors:
        source = next((e for e in TOKEN_EMBEDDINGS if e in base.tensors), None)
        if source is None:
            raise IncompatibleModelsError(
                f"{base.folder}: config ties {head_name} to the embedding, but no known token embedding is stored"
            )
        if base.tensors[source].info.shape != base.tensors[head_name].info.shape:
            raise IncompatibleModelsError(f"{base.folder}: tied {head_name} and {source} have different shapes")
        return head_name, source
    return None
