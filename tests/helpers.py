"""Assertions shared by the method tests."""

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
