"""Helpers shared by the tests: assertions for the method tests, and an interrupt at a chosen tensor."""

from __future__ import annotations

import torch

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
