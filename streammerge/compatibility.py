"""Can these checkpoints be merged? A verdict for ``streammerge inspect BASE MODEL ...`` before any merge: every
difference between each model and the base (architecture, tensors, shapes, vocabulary, tying, dtypes,
quantization), each with what streammerge does about it or the option that resolves it. Reads headers and
configs only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .classify import exclude_regex, is_derived_buffer, layout_difference, rows_differ, shape_hint
from .errors import QuantizationError
from .formats.checkpoint import Checkpoint
from .quantization import dequantization
from .recipe import HEAD_NAMES, TOKEN_EMBEDDINGS
from .vocabulary import TOKENIZER_JSON, tokenizer_difference

#: how a difference stands: merged as is, merged with a note, needs an option, or cannot be merged
FINE, NOTE, NEEDS_OPTION, BLOCKS = "fine", "note", "needs an option", "blocks"


@dataclass(frozen=True)
class Difference:
    """One way ``who`` differs from the base: ``what`` it is, ``status`` (one of the four above) and ``action``
    (what streammerge does, or the option that resolves it)."""

    who: str
    what: str
    status: str
    action: str


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def compare(base: Checkpoint, models: list[Checkpoint]) -> list[Difference]:
    """Every difference between each of ``models`` and ``base`` (an empty list: they merge as they are)."""
    out: list[Difference] = []
    views, blocked = [], set()
    for k, ckpt in enumerate([base, *models]):
        who = "the base" if k == 0 else f"model {k}"
        try:
            d = dequantization(ckpt, who)
        except QuantizationError as exc:
            out.append(Difference(who if k == 0 else f"{who} ({ckpt.folder})", f"quantized: {exc.evidence}", BLOCKS,
                                  "dequantize it and save it as bfloat16 first, or merge the unquantized release"))
            views.append(ckpt)
            blocked.add(k)  # its other differences are quantization's doing: not listed
            continue
        if d.quantized:
            out.append(Difference(who, f"quantized: {d.description}", NOTE,
                                  f"its {len(d.sources)} FP8 weights are dequantized on the fly"
                                  + ("; the output is bfloat16 (or --dtype)" if k == 0 else "")))
        views.append(d.checkpoint)
    if 0 in blocked:
        return out
    base_fp8 = views[0] is not base
    base, *models = views  # the scales and other tensors only quantized inference uses are not compared
    head = next((h for h in HEAD_NAMES if any(h in c.tensors for c in (base, *models))), HEAD_NAMES[0])
    embedding = next((e for e in TOKEN_EMBEDDINGS if e in base.tensors), None)
    for k, m in enumerate(models, 1):
        if k in blocked:
            continue
        who = f"model {k} ({m.folder})"
        if base.model_type and m.model_type and base.model_type != m.model_type:
            out.append(Difference(who, f"model_type {m.model_type!r}, the base's is {base.model_type!r}", BLOCKS,
                                  "merge checkpoints of one architecture"))
        vocab_rows = base.matrix_rows((embedding, head)), m.matrix_rows((embedding, head))
        if base.vocab_size and m.vocab_size and base.vocab_size != m.vocab_size \
                or None not in vocab_rows and vocab_rows[0] != vocab_rows[1]:
            what = (f"vocabulary: {vocab_rows[1] or m.vocab_size} embedding rows, the base's "
                    f"{vocab_rows[0] or base.vocab_size}")
            lacking = [c.folder.name for c in (base, m) if not (c.folder / TOKENIZER_JSON).is_file()]
            out.append(Difference(who, what, NEEDS_OPTION, MAP_ROWS) if not lacking else Difference(
                who, f"{what}, and {' and '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no "
                f"{TOKENIZER_JSON} to map rows through", BLOCKS,
                f"give every input its {TOKENIZER_JSON} (then {MAP_OPTION} maps the rows), or "
                "resize the embeddings to one vocabulary"))
        else:
            differ = tokenizer_difference(base.folder, m.folder)
            if differ:
                out.append(Difference(who, f"its tokenizer differs from the base's ({differ})", NOTE,
                                      "rows are merged as stored, row i with row i; " + MAP_ROWS))
        if m.tied(head) != base.tied(head):
            what = (f"{'ties' if m.tied(head) else 'does not tie'} {head} to the embedding, the base "
                    f"{'does' if base.tied(head) else 'does not'}")
            heads = [c.tensors.get(embedding if c.tied(head) else head) for c in (base, m)] if embedding else []
            if embedding is None:
                out.append(Difference(who, what + ", and the base stores no known token embedding", NEEDS_OPTION,
                                      "--embedding NAME names the token embedding (the head of a tied input)"))
            elif any(h is not None and h.info.shape[1:] != base.tensors[embedding].info.shape[1:] for h in heads):
                out.append(Difference(who, what + ", and its output head and the base's embedding have different "
                                      "widths", BLOCKS, "merge checkpoints of one model size"))
            elif any(c.tensors.get(head) is not None and c.tensors.get(embedding) is not None
                     and c.tensors[head].info.shape != c.tensors[embedding].info.shape for c in (base, m)):
                c = next(c for c in (base, m) if c.tensors.get(head) is not None and c.tensors.get(embedding)
                         is not None and c.tensors[head].info.shape != c.tensors[embedding].info.shape)
                out.append(Difference(who, what + f", and {c.folder.name}'s output head and embedding have different "
                                      f"shapes ({list(c.tensors[head].info.shape)} and "
                                      f"{list(c.tensors[embedding].info.shape)})", BLOCKS,
                                      "a model's head and embedding need one row per token each"))
            else:
                out.append(Difference(who, what, NOTE,
                                      "the head is merged from each input's effective head; the output is untied"))
        skip = {head}
        missing = [n for n in base.tensors if n not in m.tensors and n not in skip]
        extra = [n for n in m.tensors if n not in base.tensors and n not in skip]
        layouts = layout_difference({n: base.tensors[n].info.shape for n in missing if not is_derived_buffer(n)},
                                    {n: m.tensors[n].info.shape for n in extra if not is_derived_buffer(n)})
        if layouts:
            out.append(Difference(who, layouts.split(": ")[0], BLOCKS, layouts.split(": ", 1)[1]))
            continue
        universe = [*base.tensors, *m.tensors]
        for names, what in ((missing, "lacks"), (extra, "has tensors the base lacks:")):
            derived = [n for n in names if is_derived_buffer(n)]
            other = [n for n in names if not is_derived_buffer(n)]
            if derived:
                out.append(Difference(who, f"{what} {_some(derived)} (derived buffers)", FINE,
                                      "taken from the base (recomputed at load time)" if what == "lacks" else
                                      "left out, as the base has none (recomputed at load time)"))
            if other:
                out.append(Difference(who, f"{what} {_some(other)}", NEEDS_OPTION,
                                      f"--exclude {exclude_regex(other, universe)} "
                                      + ("keeps the base's value" if what == "lacks" else
                                         "leaves them out (the base has none)")))
        shapes = [n for n, loc in base.tensors.items()
                  if n in m.tensors and n not in skip and m.tensors[n].info.shape != loc.info.shape
                  and not rows_differ(n, m.tensors[n], loc, embedding)]  # other vocabularies: reported above
        if shapes:
            n = shapes[0]
            hint = shape_hint(n, m.tensors[n].info.shape, base.tensors[n].info.shape)
            vocab = "vocabulary" in hint
            out.append(Difference(
                who, f"different shapes: {n} {list(m.tensors[n].info.shape)} vs {list(base.tensors[n].info.shape)}"
                + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""),
                BLOCKS if vocab or hint.startswith(" (the hidden") else NEEDS_OPTION,
                hint.strip(" ()") if hint else f"--exclude {exclude_regex(shapes, universe)} keeps the base's value"))
        dtypes = sorted({f"{m.tensors[n].info.dtype.name} vs {loc.info.dtype.name}" for n, loc in base.tensors.items()
                         if n in m.tensors and m.tensors[n].info.dtype != loc.info.dtype})
        if dtypes:
            out.append(Difference(who, f"stored dtypes differ ({', '.join(dtypes)})", FINE,
                                  "every input is read as float32; the output takes "
                                  + ("bfloat16 (the base is FP8)" if base_fp8 else "the base's dtype") + " (or --dtype)"))
    return out


#: what maps rows between vocabularies (streammerge.vocabulary)
MAP_OPTION = "--tokenizer-source union (or base)"
MAP_ROWS = (f"{MAP_OPTION} maps every input's embedding and head rows through its "
            "tokenizer.json onto one vocabulary (in a recipe: tokenizer_source)")


def verdict(differences: list[Difference]) -> str:
    """One line: whether the checkpoints merge as they are, with options, or not at all."""
    statuses = {d.status for d in differences}
    if BLOCKS in statuses:
        return "cannot be merged as they are"
    if NEEDS_OPTION in statuses:
        return "can be merged with the options below"
    return "can be merged as they are"


def to_dict(differences: list[Difference]) -> dict[str, Any]:
    return {"verdict": verdict(differences), "differences": [asdict(d) for d in differences]}
