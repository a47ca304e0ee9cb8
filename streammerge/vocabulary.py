"""Vocabularies: the output's tokens, and for every input where each row of its token embedding and head comes from.

A recipe's ``tokenizer_source`` (mergekit 0.1.5: ``mergekit/tokenizer/build.py`` and ``embed.py``) makes the output
speak one tokenizer's vocabulary: the base's, a model's, or the *union* of every input's. Each input's
vocabulary-indexed tensors (the token embedding, an untied head) are then read through a row map
(:class:`~streammerge.sources.vocabulary.VocabularySource`), so that the method merges row ``r`` of every input as
the output's token ``r``, whatever id each input gave that token. The maps are decided once, here, from the
tokenizer files read as data (``tokenizer.json``: the model's vocabulary and its ``added_tokens``); no tokenizer code
is run and no tokenizer library is needed.

Row ``r`` of input ``k``, for the output's token ``t`` with id ``r`` (mergekit's ``PermutedVocabulary``):

- ``k``'s own row of ``t`` when it has the token (an id below its row count), unless ``tokenizer.tokens`` forces;
- else the token's default row, the same for every input that lacks it: the ``tokens:`` setting (``source: MODEL``:
  that model's row of ``t``; ``kind: model_token``: a given row of a model; ``kind: zero``); else the row of the only
  input that has ``t``; else the base's, when the recipe names a base and it has ``t``; else the mean of the rows of
  the inputs that have it; zero when none has it.

Rows past the tokens (``pad_to_multiple_of``, or a base whose embedding is padded) are each input's own stored row
where it has one past its own tokens, else the mean of its token rows (mergekit's choice, after Hewitt,
"Initializing new word embeddings", 2021). The output never has fewer rows than the base (or a model whose tokenizer
it takes): Qwen2.5's 152064 rows beside 151665 tokens stay 152064, where mergekit truncates to the tokenizer. When
every input's map is the identity (the same tokens at the same ids, the same rows), nothing is mapped at all.

The union (mergekit's ``build_union_tokenizer``): the base's tokenizer, then the tokens of every input it lacks,
regular tokens before added ones, each group in input order and by id within an input, new ids counting on from
the highest. mergekit adds the regular ones in a hash map's iteration order, which changes from run to run; its
added ones come in this order. ``tokenizer.tokens`` then adds the tokens it names that the vocabulary lacks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, PlanError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: a tokenizer.json larger than this is refused (Qwen2.5's is 7 MB, Gemma 3's 33 MB)
MAX_TOKENIZER_BYTES = 512 * 1024**2
#: largest token id accepted (ids index embedding rows)
MAX_TOKEN_ID = 2**31 - 1

if TYPE_CHECKING:
    import numpy as np

#: how a run of output rows is made (:class:`Segment`)
ROWS, MEAN, ZERO, PADDING_MEAN = "rows", "mean", "zero", "padding_mean"
_KIND_CODES = {ROWS: 0, MEAN: 1, ZERO: 2, PADDING_MEAN: 3}
_KINDS = {v: k for k, v in _KIND_CODES.items()}
#: the ``added_tokens`` entry of a token added as a plain string (transformers' ``add_tokens(str)``)
_PLAIN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


@dataclass(frozen=True)
class Segment:
    """Output rows [start, stop) of one input: ``rows`` copies rows of input ``refs[0][0]`` from row ``refs[0][1]``
    on; ``mean`` averages, row for row, the rows of every ``(input, first row)`` in ``refs``; ``zero`` is zeros;
    ``padding_mean`` is the mean of this input's mapped token rows."""

    start: int
    stop: int
    kind: str
    refs: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> list[Any]:
        return [self.start, self.stop, self.kind, [list(r) for r in self.refs]]


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's vocabulary, read from ``tokenizer.json``: every token's id (the model's vocabulary and the added
    tokens, as ``get_vocab()`` gives them) and the ``added_tokens`` entries (id order)."""

    path: Path
    ids: dict[str, int]
    added: tuple[dict[str, Any], ...]

    def below(self, rows: int) -> dict[str, int]:
        """The tokens whose ids index one of ``rows`` embedding rows (mergekit ignores the others)."""
        return {t: i for t, i in self.ids.items() if i < rows}


def read_vocabulary(folder: Path) -> Vocabulary | None:
    """The vocabulary of the tokenizer in ``folder`` (its ``tokenizer.json``), or None when it has none. Raises
    :class:`InputError` naming the file when it is not a tokenizer.json this can read (BPE, WordPiece, WordLevel or
    Unigram model; ids non-negative integers)."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        return None
    doc = _load(path)
    model = doc.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids: dict[str, int] = {}
    if kind in ("BPE", "WordPiece", "WordLevel") and isinstance(vocab, dict):
        for token, i in vocab.items():
            ids[token] = _id(i, path, token)
    elif kind == "Unigram" and isinstance(vocab, list):
        for i, entry in enumerate(vocab):
            if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                raise InputError(f"{path}: Unigram vocabulary entry {i} is {entry!r}, not [piece, score]")
            ids.setdefault(entry[0], i)
    else:
        raise InputError(f"{path}: a {kind!r} tokenizer model with a {type(vocab).__name__} vocabulary; mapping "
                         "embedding rows through tokenizers reads BPE, WordPiece, WordLevel and Unigram models")
    added = doc.get("added_tokens") or []
    if not isinstance(added, list):
        raise InputError(f"{path}: added_tokens is a {type(added).__name__}, not a list")
    entries = []
    for entry in added:
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise InputError(f"{path}: an added_tokens entry is {entry!r}, not a mapping with content and id")
        entries.append({**entry, "id": _id(entry.get("id"), path, entry["content"])})
        ids[entry["content"]] = entries[-1]["id"]
    return Vocabulary(path, ids, tuple(sorted(entries, key=lambda e: e["id"])))


def tokenizer_difference(base: Path, model: Path) -> str | None:
    """How the tokenizer in folder ``model`` gives tokens other ids than the one in ``base`` (both read from their
    tokenizer.json), or None when they agree, or either has none or cannot be read."""
    a_path, b_path = base / TOKENIZER_JSON, model / TOKENIZER_JSON
    if not (a_path.is_file() and b_path.is_file()) or a_path.read_bytes() == b_path.read_bytes():
        return None
    try:
        a, b = read_vocabulary(base), read_vocabulary(model)
    except InputError:
        return None
    if a is None or b is None or a.ids == b.ids:
        return None
    moved = sum(1 for t, i in b.ids.items() if t in a.ids and a.ids[t] != i)
    new = sum(1 for t in b.ids if t not in a.ids)
    parts = [f"{moved} tokens at other ids" if moved else "", f"{new} tokens the base lacks" if new else ""]
    return ", ".join(p for p in parts if p) or "the base has tokens it lacks"


def _load(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise InputError(f"{path}: {size} bytes, more than a tokenizer.json holds ({MAX_TOKENIZER_BYTES} at most)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a tokenizer.json is a JSON object, got {type(doc).__name__}")
    return doc


def _id(value: Any, path: Path, token: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_ID:
        raise InputError(f"{path}: token {token!r} has id {value!r}, not an integer in [0, {MAX_TOKEN_ID}]")
    return value


@dataclass(frozen=True)
class TokenDefault:
    """A ``tokenizer.tokens`` setting (mergekit's ``TokenEmbeddingConfig``): ``kind`` ``model`` (input ``input``'s
    row of the token), ``model_token`` (input ``input``'s row ``token_id``, or its row of ``token``), ``zero``, or
    ``none`` (no source given); ``force``: every input takes it, even one that has the token."""

    kind: str
    input: int | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenDefault:
        return cls(d.get("kind", "none"), d.get("input"), d.get("token_id"), d.get("token"), bool(d.get("force")))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for key in ("input", "token_id", "token"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **({"force": True} if self.force else {})}


@dataclass(frozen=True)
class VocabularyPlan:
    """The output's vocabulary and each input's row map.

    ``tokens``: the rows that hold tokens (the highest id + 1); ``rows``: the output's rows; ``maps``: per input (the
    base first), its segments covering [0, rows); ``added``: the ``added_tokens`` entries the output's tokenizer gets
    beyond ``source``'s (the folder whose tokenizer files the output copies)."""

    tokens: int
    rows: int
    maps: tuple[tuple[Segment, ...], ...]
    source: Path
    added: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]

    def counts(self, k: int) -> dict[str, int]:
        """Rows of input ``k``'s map by how they are made (:func:`segment_counts`)."""
        return segment_counts(self.maps[k], k)


def segment_counts(segments: Sequence[Segment], own: int) -> dict[str, int]:
    """Rows of input ``own``'s map by how they are made: ``own`` (its rows), ``other`` (another input's row of a token
    it lacks), ``mean``, ``zero``, ``padding_mean``."""
    out = {"own": 0, "other": 0, MEAN: 0, ZERO: 0, PADDING_MEAN: 0}
    for s in segments:
        key = ("own" if s.refs[0][0] == own else "other") if s.kind == ROWS else s.kind
        out[key] += s.stop - s.start
    return out


@dataclass(frozen=True)
class VocabInput:
    """What planning the vocabulary needs of one input: where its tokenizer is (an adapter's folder first), how many
    embedding rows it has, and which input it repeats (the same model given twice counts once, as in mergekit)."""

    folders: tuple[Path, ...]  # where to look for tokenizer.json, in order
    rows: int
    same_as: int  # the first input that is this same model (itself if none)
    name: str  # for messages: "the base", "model 2"


def plan_vocabulary(inputs: Sequence[VocabInput], union: bool, source: Path, source_input: int | None,
                    tokens: dict[str, TokenDefault], pad_to_multiple_of: int | None,
                    named_base: bool, source_name: str | None = None) -> VocabularyPlan | None:
    """Each input's row map onto the output's vocabulary (see the module docstring); None when every map is the
    identity. ``source``: the folder whose tokenizer the output takes (the base's for a union), ``source_input``: the
    input that folder is (None: a tokenizer-only folder); ``named_base``: the recipe names a base (mergekit's
    ``base_model``), whose row a token takes before a mean; ``source_name``: how notes name the source (its Hub ID).
    Raises :class:`PlanError` when a map cannot be made."""
    vocabs = [_first_vocabulary(i.folders) for i in inputs]
    src = vocabs[source_input] if source_input is not None else read_vocabulary(source)
    if src is None:
        if union or tokens:
            raise PlanError(f"{source} has no {TOKENIZER_JSON}: the output's vocabulary is built from it (save the "
                            "tokenizer with transformers' save_pretrained to write one)")
        if pad_to_multiple_of and inputs[0].rows % pad_to_multiple_of:
            raise PlanError(f"pad_to_multiple_of {pad_to_multiple_of}: the embedding's {inputs[0].rows} rows need "
                            "padding rows (the mean of the token rows), and which rows are tokens is read from "
                            f"{TOKENIZER_JSON}, which {source} lacks")
        if len({i.rows for i in inputs}) > 1:
            raise PlanError(f"the inputs' embeddings have {sorted({i.rows for i in inputs})} rows, and {source} has "
                            f"no {TOKENIZER_JSON} to map them onto: give it its tokenizer")
        return None  # nothing to map through, and nothing that needs mapping
    missing = [i.name for i, v in zip(inputs, vocabs) if v is None]
    for i, v in zip(inputs, vocabs):
        model = next((f / "tokenizer.model" for f in i.folders if (f / "tokenizer.model").is_file()), None)
        if v is None and model is not None:
            raise PlanError(f"{i.name} has {model} (a sentencepiece tokenizer) but no {TOKENIZER_JSON}, which is what "
                            "maps its rows: save it once with transformers (AutoTokenizer.from_pretrained(FOLDER)"
                            ".save_pretrained(FOLDER) writes tokenizer.json)")
    if len(missing) == len(inputs) and not (union or tokens) and len({i.rows for i in inputs}) == 1 \
            and max(src.ids.values(), default=-1) < inputs[0].rows \
            and not (pad_to_multiple_of and inputs[0].rows % pad_to_multiple_of):
        return None  # no input says which token a row is: they are taken to be the tokenizer's, as stored
    for k, v in enumerate(vocabs):
        if v is None:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
            if inputs[k].rows != inputs[0].rows or vocabs[0] is None:
                raise PlanError(f"{inputs[k].name} ({inputs[k].folders[0]}) has no {TOKENIZER_JSON} and "
                                f"{inputs[k].rows} embedding rows: without its tokenizer its rows cannot be mapped "
                                "onto the output's tokens")
            vocabs[k] = vocabs[0]
    have = [v.below(i.rows) for v, i in zip(vocabs, inputs)]  # type: ignore[union-attr]
    out_ids = dict(src.ids)
    added: list[dict[str, Any]] = []
    next_id = max(out_ids.values(), default=-1) + 1

    def add(token: str, entry: dict[str, Any]) -> None:
        nonlocal next_id
        if token not in out_ids:
            out_ids[token] = next_id
            added.append({**entry, "id": next_id, "content": token})
            next_id += 1

    distinct = [k for k, i in enumerate(inputs) if i.same_as == k]
    if union:
        added_anywhere = {e["content"] for k in distinct for e in vocabs[k].added if e["id"] < inputs[k].rows}  # type: ignore[union-attr]
        for k in distinct:
            for token, _ in sorted(have[k].items(), key=lambda item: item[1]):
                if token not in added_anywhere:
                    add(token, _PLAIN)
        for k in distinct:
            for entry in vocabs[k].added:  # type: ignore[union-attr]
                if entry["id"] < inputs[k].rows:
                    add(entry["content"], {key: v for key, v in entry.items() if key not in ("id", "content")})
    for token in tokens:
        add(token, _PLAIN)
    n_tokens = max(out_ids.values(), default=-1) + 1
    rows = max(n_tokens, inputs[0].rows, inputs[source_input].rows if source_input is not None else 0)
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    defaults = _defaults(inputs, vocabs, have, out_ids, tokens, distinct, named_base)  # type: ignore[arg-type]
    maps = tuple(_map(k, inputs[k], have[k], out_ids, n_tokens, rows, defaults, tokens) for k in range(len(inputs)))
    if all(len(m) == 1 and m[0].kind == ROWS and m[0].refs == ((k, 0),) and inputs[k].rows == rows
           for k, m in enumerate(maps)):
        return None
    name = source_name or source.name
    notes = [f"vocabulary: the output has {n_tokens} tokens"
             + (f" ({len(added)} added to {name}'s tokenizer)" if added else f" ({name}'s tokenizer)")
             + f" and {rows} embedding rows; rows are mapped through each input's tokenizer"]
    if missing:
        notes.append(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no {TOKENIZER_JSON}: taken to "
                     "have the base's vocabulary (as mergekit does)")
    nobody = [t for t, (how, _) in defaults.items() if how == ZERO and tokens.get(t) is None]
    if nobody:
        notes.append(f"{len(nobody)} token{'s' if len(nobody) > 1 else ''} no input has ({', '.join(nobody[:5])}"
                     f"{', ...' if len(nobody) > 5 else ''}) get zero rows (mergekit: 'not found in any model')")
    for k, i in enumerate(inputs):
        c = segment_counts(maps[k], k)
        lacking = c["other"] + c[MEAN] + c[ZERO]
        if lacking or c[PADDING_MEAN]:
            notes.append(f"{i.name}: {lacking} token rows from the other inputs (tokens it lacks)"
                         + (f", {c[PADDING_MEAN]} padding rows set to the mean of its token rows"
                            if c[PADDING_MEAN] else ""))
    return VocabularyPlan(n_tokens, rows, maps, source, tuple(added), tuple(notes))


def _first_vocabulary(folders: Sequence[Path]) -> Vocabulary | None:
    for folder in folders:
        v = read_vocabulary(folder)
        if v is not None:
            return v
    return None


def _defaults(inputs: Sequence[VocabInput], vocabs: list[Vocabulary], have: list[dict[str, int]],
              out_ids: dict[str, int], tokens: dict[str, TokenDefault], distinct: list[int],
              named_base: bool) -> dict[str, tuple[str, tuple[tuple[int, int], ...]]]:
    """Every output token's default row, for the inputs that lack it (mergekit's ``assign_embedding_sources`` and
    ``compute_default_embedding``): token → (kind, refs)."""
    out: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {}
    for token in out_ids:
        present = [k for k in distinct if token in have[k]]
        cfg = tokens.get(token)
        if cfg is not None and cfg.kind != "none":
            out[token] = _configured(token, cfg, inputs, vocabs, have)
        elif cfg is not None and (cfg.force or len(present) < len(distinct)):
            raise PlanError(f"tokenizer.tokens {token!r} gives no source, and "
                            + ("force needs one" if cfg.force else "some inputs lack the token") +
                            ": give source: MODEL, or source: {kind: zero}")
        elif len(present) == 1:
            out[token] = (ROWS, ((present[0], have[present[0]][token]),))
        elif not present:
            out[token] = (ZERO, ())
        elif named_base and 0 in present:
            out[token] = (ROWS, ((0, have[0][token]),))
        elif len(present) < len(distinct):
            out[token] = (MEAN, tuple((k, have[k][token]) for k in present))
    return out


def _configured(token: str, cfg: TokenDefault, inputs: Sequence[VocabInput], vocabs: list[Vocabulary],
                have: list[dict[str, int]]) -> tuple[str, tuple[tuple[int, int], ...]]:
    if cfg.kind == "zero":
        return ZERO, ()
    k = cfg.input
    assert k is not None
    who = f"tokenizer.tokens {token!r}: {inputs[k].name}"
    if cfg.kind == "model":
        if token not in have[k]:
            raise PlanError(f"{who} has no token {token!r} (name another model, or kind: model_token)")
        return ROWS, ((k, have[k][token]),)
    row = cfg.token_id if cfg.token_id is not None else vocabs[k].ids.get(cfg.token or "")
    if row is None:
        raise PlanError(f"{who} has no token {cfg.token!r}")
    if not 0 <= row < inputs[k].rows:
        raise PlanError(f"{who} has {inputs[k].rows} embedding rows, so no row {row}")
    return ROWS, ((k, row),)


def _map(k: int, inp: VocabInput, have: dict[str, int], out_ids: dict[str, int], n_tokens: int, rows: int,
         defaults: dict[str, tuple[str, tuple[tuple[int, int], ...]]],
         tokens: dict[str, TokenDefault]) -> tuple[Segment, ...]:
    """Input ``k``'s segments over the output's ``rows`` rows."""
    import numpy as np  # noqa: PLC0415 (the command line starts without numpy)

    kind = np.full(rows, _KIND_CODES[ZERO], dtype=np.int8)  # ids no token has: zeros (mergekit's new_embed)
    src = np.full(rows, -1, dtype=np.int64)
    row = np.full(rows, -1, dtype=np.int64)
    means: dict[int, tuple[tuple[int, int], ...]] = {}
    for token, r in out_ids.items():
        cfg = tokens.get(token)
        if token in have and not (cfg is not None and cfg.force):
            kind[r], src[r], row[r] = _KIND_CODES[ROWS], k, have[token]
            continue
        how, refs = defaults[token]
        kind[r] = _KIND_CODES[how]
        if how == ROWS:
            src[r], row[r] = refs[0]
        elif how == MEAN:
            means[r] = refs
    own_tokens = max(have.values(), default=-1) + 1
    if rows > n_tokens:  # padding: its own stored padding row, else the mean of its token rows
        pad = np.arange(n_tokens, rows)
        stored = (pad >= own_tokens) & (pad < inp.rows)
        kind[n_tokens:] = np.where(stored, _KIND_CODES[ROWS], _KIND_CODES[PADDING_MEAN])
        src[n_tokens:] = np.where(stored, k, -1)
        row[n_tokens:] = np.where(stored, pad, -1)
    return _segments(kind, src, row, means)


def _segments(kind: np.ndarray, src: np.ndarray, row: np.ndarray,
              means: dict[int, tuple[tuple[int, int], ...]]) -> tuple[Segment, ...]:
    """Runs of rows made alike: consecutive rows of one input, zeros, padding means; one segment per mean row."""
    import numpy as np  # noqa: PLC0415

    n = len(kind)
    if n == 0:
        return ()
    cut = np.ones(n, dtype=bool)
    is_rows = kind == _KIND_CODES[ROWS]
    cut[1:] = (kind[1:] != kind[:-1]) | (src[1:] != src[:-1]) | (is_rows[1:] & (row[1:] != row[:-1] + 1)) \
        | (kind[1:] == _KIND_CODES[MEAN])
    starts = np.flatnonzero(cut).tolist()
    out = []
    for a, b in zip(starts, [*starts[1:], n]):
        how = _KINDS[int(kind[a])]
        refs = ((int(src[a]), int(row[a])),) if how == ROWS else means[a] if how == MEAN else ()
        out.append(Segment(a, b, how, refs))
    return tuple(out)


def tokenizer_documents(plan: VocabularyPlan) -> dict[str, dict[str, Any]]:
    """The output's ``tokenizer.json`` (and ``tokenizer_config.json``, when the source has one listing its added
    tokens) with the tokens the plan adds, read from the source folder now (they are large: not kept in the plan);
    empty when nothing is added."""
    if not plan.added:
        return {}
    doc = _load(plan.source / TOKENIZER_JSON)
    doc["added_tokens"] = [*(doc.get("added_tokens") or []), *plan.added]
    out = {TOKENIZER_JSON: doc}
    config_path = plan.source / TOKENIZER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {**config["added_tokens_decoder"], **{
                str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in plan.added}}
            out[TOKENIZER_CONFIG] = config
    return out
