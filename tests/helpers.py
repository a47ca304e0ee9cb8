"""Helpers shared by the tests: assertions for the method tests, and an interrupt at a chosen tensor."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


def assert_matches(got: Tensors, expected: Tensors, atol: float = 1e-6) -> None:
    """Same tensor names, float32, same shapes, and values within ``atol`` of the reference."""
    assert sorted(got) == sorted(expected)
    for name, e in expected.items():
        g = got[name]
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        err = (g - e).abs().max().item()
        assert err <= atol, f"{name}: max |engine - reference| = {err:.3g}"


def interrupt_at_tensor(monkeypatch, n: int) -> None:
    """Make the local executor raise ``KeyboardInterrupt`` (a Ctrl-C) as it starts its ``n``-th tensor (1-based);
    ``monkeypatch.undo()`` ends it."""
    from streammerge import execute

    real, calls = execute.run_tensor, []

    def interrupted(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(execute, "run_tensor", interrupted)


def arm_chunk_interrupt(n: int) -> None:
    """Make the ``n``-th journaled chunk of the next in-process merge raise ``KeyboardInterrupt`` (on the writer
    thread, as a second Ctrl-C would), leaving chunks journaled mid-tensor; the hook removes itself when it fires
    (``faults.set_hook(None)`` removes it otherwise)."""
    from streammerge import faults

    seen = [0]

    def hook(event: str) -> None:
        if event == "chunk-written":
            seen[0] += 1
            if seen[0] == n:
                faults.set_hook(None)
                raise KeyboardInterrupt

    faults.set_hook(hook)


def interrupt_merge_after_chunks(n: int, merge) -> None:  # type: ignore[no-untyped-def]
    """Run ``merge()`` (a zero-argument callable) with a Ctrl-C raised after its ``n``-th written chunk, and check
    that it stopped as an interrupted merge (its work folder kept for a resume)."""
    import pytest

    from streammerge import faults
    from streammerge.execute import MergeInterrupted

    arm_chunk_interrupt(n)
    try:
        with pytest.raises(MergeInterrupted):
            merge()
    finally:
        faults.set_hook(None)


# ------------------------------------------------------------------------------------------- finished outputs

def partial(out):  # type: ignore[no-untyped-def]
    """The work folder of output ``out``."""
    return out.with_name(out.name + ".streammerge-partial")


def safetensors_header(path):  # type: ignore[no-untyped-def]
    """(data start, header dict) of a safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n, json.loads(raw[8:8 + n])


def where(path, offset: int) -> str:  # type: ignore[no-untyped-def]
    """What byte ``offset`` of a safetensors file holds: a tensor's data, the header, or nothing."""
    start, h = safetensors_header(path)
    for name, t in h.items():
        if name != "__metadata__" and start + t["data_offsets"][0] <= offset < start + t["data_offsets"][1]:
            return f"tensor {name}"
    return "the header" if offset < start else "past the data"


def output_problems(out, ref) -> list[str]:  # type: ignore[no-untyped-def]
    """Differences between a finished output folder and a reference one (empty: identical).

    Every file must be byte-identical, the manifest, index and side files included. No work folder may be left,
    and ``verify`` must pass.
    """
    from streammerge.verify import verify_output

    problems = []
    if partial(out).exists():
        problems.append(f"{partial(out)} was left behind: {sorted(p.name for p in partial(out).iterdir())}")
    if not out.is_dir():
        return problems + [f"{out} does not exist"]
    names, ref_names = {p.name for p in out.iterdir()}, {p.name for p in ref.iterdir()}
    if names != ref_names:
        problems.append(f"files {sorted(names)} != reference {sorted(ref_names)}")
    for name in sorted(names & ref_names):
        a, b = (out / name).read_bytes(), (ref / name).read_bytes()
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            at = f" ({where(out / name, i)})" if name.endswith(".safetensors") else ""
            problems.append(f"{name} differs from byte {i}{at}; sizes {len(a)} vs {len(b)}")
    bad, _ = verify_output(out)
    return problems + [f"verify: {p}" for p in bad]


def assert_same_output(out, ref) -> None:  # type: ignore[no-untyped-def]
    problems = output_problems(out, ref)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------- mergekit 0.1.5 itself

def find_mergekit():  # type: ignore[no-untyped-def]
    """mergekit 0.1.5's ``mergekit-yaml`` from its own environment (it must not change this one's pinned torch):
    ``STREAMMERGE_MERGEKIT``, else ``.ci-mergekit-venv`` (which ``.ci/run`` installs when it can) or
    ``bench/.mergekit-venv``; None when there is none."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for candidate in (os.environ.get("STREAMMERGE_MERGEKIT"), root / ".ci-mergekit-venv/bin/mergekit-yaml",
                      root / "bench/.mergekit-venv/bin/mergekit-yaml"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


MERGEKIT_MISSING = ("mergekit 0.1.5 is not installed (.ci/run installs it in .ci-mergekit-venv when it can; or set "
                    "STREAMMERGE_MERGEKIT to its mergekit-yaml)")


def merge_both(mergekit, workdir, name: str, text: str, *extra: str):  # type: ignore[no-untyped-def]
    """Write recipe ``text`` as ``workdir/<name>.yml`` and merge it with mergekit (``mk-<name>``) and with
    streammerge's CLI (``sm-<name>``), from ``workdir`` (the recipes name models relative to it, as mergekit reads
    them), ``extra`` streammerge options. Returns (ours, theirs): the two ``model.safetensors`` loaded; fails the test naming whichever failed."""
    import os
    import subprocess

    import pytest
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from streammerge.cli import main

    recipe = workdir / f"{name}.yml"
    recipe.write_text(text)
    mk, sm = workdir / f"mk-{name}", workdir / f"sm-{name}"
    proc = subprocess.run([str(mergekit), str(recipe), str(mk), "--no-copy-tokenizer", "--no-write-model-card"],
                          cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if not (mk / "model.safetensors").is_file():
        pytest.fail(f"mergekit failed on {name}: {proc.stderr[-2000:]}")
    r = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(sm), "-q", *extra])
    assert r.exit_code == 0, r.output
    return load_file(sm / "model.safetensors"), load_file(mk / "model.safetensors")


def write_tokenizer(folder, vocab: dict, added: dict | None = None) -> None:  # type: ignore[no-untyped-def]
    """A WordLevel ``tokenizer.json`` (and a ``tokenizer_config.json`` that transformers loads it with) in ``folder``:
    ``vocab`` the model's tokens (token: id), ``added`` special added tokens (token: id)."""
    import json

    entries = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for t, i in sorted((added or {}).items(), key=lambda item: item[1])]
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": next(iter(vocab))}}
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
              "added_tokens_decoder": {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in entries}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def set_vocab_rows(folder, order, seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    """Rewrite ``folder``'s token embedding and untied head so that row ``i`` is its old row ``order[i]``, or (for
    ``order[i]`` None) a new row drawn from ``seed``; config.json's vocab_size follows."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            old = tensors[name]
            rows = [old[i] if i is not None else (0.02 * torch.randn(old.shape[1], generator=g)).to(old.dtype)
                    for i in order]
            tensors[name] = torch.stack(rows).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(order)
    (folder / "config.json").write_text(json.dumps(config))


def write_vocabulary_family(root) -> None:  # type: ignore[no-untyped-def]
    """A tiny-llama family (float32, 3 layers) whose inputs differ in vocabulary, in ``root``: base (tokens t0 …
    t300), chat (+ <|im_start|>, <|im_end|>: 303 rows), multilingual (its ids shuffled, its rows moved with them,
    + <|im_end|>, <vi>: 303 rows) and plain (multilingual with the base's ids: the same rows, unshuffled)."""
    import random
    import shutil
    from dataclasses import replace

    from streammerge.examples import SHAPES, write_family

    n = 301
    write_family(root, replace(SHAPES["tiny-llama"], layers=3), dtype="f32")
    base_vocab = {f"t{i}": i for i in range(n)}
    write_tokenizer(root / "base", base_vocab)
    write_tokenizer(root / "chat", base_vocab, {"<|im_start|>": n, "<|im_end|>": n + 1})
    set_vocab_rows(root / "chat", [*range(n), None, None], seed=1)
    shutil.copytree(root / "multilingual", root / "plain")
    write_tokenizer(root / "plain", base_vocab, {"<|im_end|>": n, "<vi>": n + 1})
    set_vocab_rows(root / "plain", [*range(n), None, None], seed=2)
    perm = list(range(n))
    random.Random(0).shuffle(perm)  # token t{i} has id perm[i]
    inverse = [0] * n
    for i, p in enumerate(perm):
        inverse[p] = i
    write_tokenizer(root / "multilingual", {f"t{i}": perm[i] for i in range(n)}, {"<|im_end|>": n, "<vi>": n + 1})
    shutil.copyfile(root / "plain" / "model.safetensors", root / "multilingual" / "model.safetensors")
    shutil.copyfile(root / "plain" / "config.json", root / "multilingual" / "config.json")
    set_vocab_rows(root / "multilingual", [*inverse, n, n + 1])  # row perm[i] is plain's row i (token t{i})


def with_nan(model: Path, to: Path) -> Path:
    """A copy of ``model`` with a NaN in one element of a weight."""
    to.mkdir()
    for f in model.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    tensors = load_file(to / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


@contextlib.contextmanager
def spying(names: Iterable[str]) -> Iterator[Counter[str]]:
    """Count the calls of the fused kernels ``names`` (the methods look them up on the kernels' module at each call);
    nothing is counted when numba is not there."""
    from streammerge import kernels

    calls: Counter[str] = Counter()
    with pytest.MonkeyPatch.context() as mp:
        module = kernels._load()
        for name in names if module is not None else ():
            real = getattr(module, name)

            def spy(*args, _real=real, _name=name):  # type: ignore[no-untyped-def]
                calls[_name] += 1
                return _real(*args)

            mp.setattr(module, name, spy)
        yield calls
