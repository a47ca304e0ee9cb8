"""The text the quality bench trains and evaluates on, all read from this machine (nothing is downloaded).

English (what the base learns): Debian package documentation under ``/usr/share/doc`` (README, changelog,
copyright, NEWS ..., ``.gz`` decompressed) and the English msgids of every gettext catalog under
``/usr/share/locale``. The new language (what the PT variant learns): the msgstrs of one language's catalogs
(Vietnamese by default). The FT tasks are synthetic, with exact-match answers.

Held-out splits are decided by a CRC-32 of the text (or of the package name for documentation), so they are the
same on every run and for every seed.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DOC_ROOT = Path("/usr/share/doc")
LOCALE_ROOT = Path("/usr/share/locale")
#: languages tried, in order, when the requested one has no catalogs (a Latin script with diacritics, like Vietnamese)
FALLBACK_LANGUAGES = ("vi", "id", "tr", "pl", "cs", "ro", "hu", "fi")
MIN_LANGUAGE_BYTES = 200_000


# ----------------------------------------------------------------------------------------------- gettext catalogs
def read_mo(path: Path) -> list[tuple[list[str], list[str]]]:
    """The entries of a GNU ``.mo`` catalog as (msgids, msgstrs): singular and plural forms, context removed.

    A direct reading of the format (magic, revision, count, offsets of the original and translated string tables);
    strings are decoded with the charset of the header entry, undecodable bytes replaced. The header is left out.
    """
    data = path.read_bytes()
    if len(data) < 28:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(magic)
    if order is None:
        return []
    _revision, count, originals, translations = struct.unpack(order + "4I", data[4:20])
    raw: list[tuple[bytes, bytes]] = []
    for i in range(count):
        try:
            olen, ooff = struct.unpack_from(order + "2I", data, originals + 8 * i)
            tlen, toff = struct.unpack_from(order + "2I", data, translations + 8 * i)
        except struct.error:
            break
        raw.append((data[ooff:ooff + olen], data[toff:toff + tlen]))
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            found = re.search(rb"charset=([A-Za-z0-9_.:-]+)", msgstr)
            if found:
                charset = found.group(1).decode("ascii")
    try:
        "".encode(charset)
    except LookupError:
        charset = "utf-8"
    entries = []
    for msgid, msgstr in raw:
        if msgid == b"":
            continue
        ids = msgid.decode(charset, errors="replace").split("\x04")[-1].split("\x00")
        strs = msgstr.decode(charset, errors="replace").split("\x00")
        entries.append(([s for s in ids if s], [s for s in strs if s]))
    return entries


def catalogs(language: str | None = None) -> list[Path]:
    """The ``.mo`` files of one language (``None``: of every language), sorted."""
    pattern = f"{language}/LC_MESSAGES/*.mo" if language else "*/LC_MESSAGES/*.mo"
    return sorted(p for p in LOCALE_ROOT.glob(pattern) if p.is_file())


def pick_language(wanted: str) -> tuple[str, str]:
    """The language whose msgstrs the PT variant learns: ``wanted`` if its catalogs hold enough text, else the first
    of :data:`FALLBACK_LANGUAGES` that does; with a note saying which and why."""
    for lang in (wanted, *[x for x in FALLBACK_LANGUAGES if x != wanted]):
        size = sum(p.stat().st_size for p in catalogs(lang))
        if size >= MIN_LANGUAGE_BYTES:
            note = "" if lang == wanted else (f"no (or too few) '{wanted}' catalogs under {LOCALE_ROOT}: "
                                              f"used '{lang}' ({size} bytes of .mo files) instead")
            return lang, note
    raise SystemExit(f"no language under {LOCALE_ROOT} has {MIN_LANGUAGE_BYTES} bytes of catalogs")


# ----------------------------------------------------------------------------------------------- documentation
def english_docs(max_bytes: int, per_file: int) -> list[tuple[str, bytes]]:
    """(package, text) for the documentation files of ``/usr/share/doc``: the first ``per_file`` bytes of each
    UTF-8 file that is at least 99% ASCII (English; translated READMEs are left out), in sorted path order, until
    ``max_bytes`` are collected."""
    out: list[tuple[str, bytes]] = []
    total = 0
    for root, dirs, files in os.walk(DOC_ROOT):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink():
                continue
            try:
                with (gzip.open(path) if name.endswith(".gz") else open(path, "rb")) as fh:
                    data = fh.read(per_file + 1)
                if len(data) > per_file:  # cut at the last line end, not inside a UTF-8 sequence
                    data = data[:data.rfind(b"\n", 0, per_file) + 1]
                data.decode("utf-8")
            except (OSError, EOFError, UnicodeDecodeError, zlib.error, gzip.BadGzipFile):
                continue
            if not data or b"\x00" in data or (np.frombuffer(data, np.uint8) < 128).mean() < 0.99:
                continue
            package = path.relative_to(DOC_ROOT).parts[0]
            out.append((package, data))
            total += len(data)
            if total >= max_bytes:
                return out
    return out


# ----------------------------------------------------------------------------------------------- the corpus
def held_out(key: str, percent: int) -> bool:
    """Whether ``key`` falls in the held-out ``percent`` (a CRC-32 split: the same on every run)."""
    return zlib.crc32(key.encode("utf-8", errors="replace")) % 100 < percent


@dataclass
class Corpus:
    """Byte streams (uint8) for training and evaluation, and what went into them."""

    en_docs: np.ndarray
    en_msgids: np.ndarray
    en_test: np.ndarray
    new_train: np.ndarray
    new_test: np.ndarray
    language: str
    stats: dict = field(default_factory=dict)


def _stream(parts: list[bytes], sep: bytes) -> np.ndarray:
    return np.frombuffer(sep.join(parts), dtype=np.uint8).copy()


def build_corpus(language: str, max_doc_bytes: int, doc_per_file: int, all_catalogs: bool,
                 test_percent: int = 5) -> Corpus:
    """Read the English and new-language text and split it into train and held-out streams.

    ``all_catalogs``: English msgids from every language's catalogs (else from the new language's only, faster).
    """
    lang, note = pick_language(language)
    docs = english_docs(max_doc_bytes, doc_per_file)
    doc_train = [text for pkg, text in docs if not held_out(pkg, test_percent)]
    doc_test = [text for pkg, text in docs if held_out(pkg, test_percent)]
    msgids: set[str] = set()
    for path in catalogs(None if all_catalogs else lang):
        for ids, _ in read_mo(path):
            msgids.update(ids)
    translated: set[str] = set()
    for path in catalogs(lang):
        for ids, strs in read_mo(path):
            for s in strs:
                # a translation (not the English copied through) in the language's own letters: any non-ASCII
                if s not in ids and any(ord(c) > 127 for c in s):
                    translated.add(s)
    ids_sorted = sorted(msgids)
    new_sorted = sorted(translated)
    msg_train = [s.encode() for s in ids_sorted if not held_out(s, test_percent)]
    msg_test = [s.encode() for s in ids_sorted if held_out(s, test_percent)]
    new_train = [s.encode() for s in new_sorted if not held_out(s, test_percent)]
    new_test = [s.encode() for s in new_sorted if held_out(s, test_percent)]
    # shuffle the held-out pieces once (fixed seed) so evenly spaced evaluation windows sample every source
    rng = random.Random(1234)
    en_test_parts = doc_test + msg_test
    rng.shuffle(en_test_parts)
    rng.shuffle(new_test)
    corpus = Corpus(
        en_docs=_stream(doc_train, b"\n\n"), en_msgids=_stream(msg_train, b"\n"),
        en_test=_stream(en_test_parts, b"\n"), new_train=_stream(new_train, b"\n"), new_test=_stream(new_test, b"\n"),
        language=lang)
    corpus.stats = {
        "language": lang, "language_note": note,
        "doc_files": len(docs), "doc_packages": len({p for p, _ in docs}),
        "english_catalogs": len(catalogs(None if all_catalogs else lang)), "language_catalogs": len(catalogs(lang)),
        "english_msgids": len(ids_sorted), "language_msgstrs": len(new_sorted),
        "bytes": {"en_docs_train": int(corpus.en_docs.size), "en_msgids_train": int(corpus.en_msgids.size),
                  "en_test": int(corpus.en_test.size), "new_train": int(corpus.new_train.size),
                  "new_test": int(corpus.new_test.size)},
        "test_percent": test_percent,
    }
    return corpus


# ----------------------------------------------------------------------------------------------- FT tasks
TASKS = ("copy", "upper", "reverse", "sort")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def make_example(task: str, rng: random.Random, lo: int, hi: int) -> tuple[str, str]:
    """One (prompt, answer) of ``task``: ``copy: abc =>`` ``abc``, ``upper: abc =>`` ``ABC``, ``reverse: abc =>``
    ``cba``, ``sort: cab =>`` ``abc``, ``a=xqz b=mno c=pqr; get b =>`` ``mno`` (the value of a key in the context)."""
    if task == "lookup":
        keys = rng.sample(LETTERS, rng.randint(2, 4))
        values = [_word(rng, 3, 3) for _ in keys]
        key = rng.choice(keys)
        context = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return f"{context}; get {key} =>", values[keys.index(key)]
    word = _word(rng, lo, hi)
    answer = {"copy": word, "upper": word.upper(), "reverse": word[::-1], "sort": "".join(sorted(word))}[task]
    return f"{task}: {word} =>", answer


def is_eval_example(prompt: str) -> bool:
    """Prompts kept for evaluation only (12.5% of all prompts, by CRC-32): training never sees them."""
    return zlib.crc32(prompt.encode()) % 8 == 0


def task_examples(n: int, seed: int, lo: int, hi: int, evaluation: bool) -> list[tuple[str, str, str]]:
    """``n`` (task, prompt, answer) triples, tasks in turn; ``evaluation``: held-out prompts (else training ones)."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        task = TASKS[len(out) % len(TASKS)]
        prompt, answer = make_example(task, rng, lo, hi)
        if is_eval_example(prompt) != evaluation or (evaluation and prompt in seen):
            continue
        seen.add(prompt)
        out.append((task, prompt, answer))
    return out


#: ``--ft-style format``: the base's own prompt formats for the tasks (pre-training), unlike the FT/evaluation format
#: ``reverse: abc =>cba`` (other markers). The first is "the base's format" in the scores; a base pre-trained with
#: several (``base_task_formats``) has seen that the markers vary, as a large model's pre-training data does.
PRETRAIN_PROMPTS = ("Q: {task} {word}\nA: ", "{task}({word}) = ", "Task: {task}\nInput: {word}\nOutput: ",
                    "[{task}] {word} -> ")


def pretrain_format(examples: list[tuple[str, str, str]], formats: int = 1) -> list[tuple[str, str, str]]:
    """The same (task, prompt, answer) triples with each prompt rewritten from the FT format (``reverse: abc =>``)
    to one of the first ``formats`` of :data:`PRETRAIN_PROMPTS` in turn (``Q: reverse abc\\nA: ``, ...); the
    answers are unchanged. Training and held-out words stay as they were split (by the CRC-32 of the FT-format
    prompt)."""
    out = []
    for i, (task, prompt, answer) in enumerate(examples):
        head, tail = f"{task}: ", " =>"
        if not (prompt.startswith(head) and prompt.endswith(tail)):
            raise ValueError(f"not an FT-format prompt of {task!r}: {prompt!r}")
        template = PRETRAIN_PROMPTS[(i // len(TASKS)) % formats]  # tasks come in turn: every task gets every format
        out.append((task, template.format(task=task, word=prompt[len(head):-len(tail)]), answer))
    return out
