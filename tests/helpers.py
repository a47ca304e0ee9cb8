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
