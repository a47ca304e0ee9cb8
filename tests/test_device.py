"""``--device`` and ``--max-vram``: resolution and errors everywhere; the staging path of an accelerator (inputs
copied away from their slots, outputs copied back) on the CPU with a stand-in device; and, where CUDA is present,
CPU/GPU agreement, GPU chunk invariance and the VRAM budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import streammerge.execute
from streammerge import api
from streammerge.budget import Budget, make_budget
from streammerge.cli import main
from streammerge.device import CpuCompute, DeviceError, resolve_device
from streammerge.errors import PlanError
from streammerge.examples import write_family
from streammerge.fingerprint import describe_changes
from streammerge.formats.checkpoint import load_checkpoint
from streammerge.planner import make_plan
from streammerge.recipe import Recipe

CUDA = torch.cuda.is_available()
#: method -> parameters, covering every kind of pass (statistics, selections, random masks, embeddings)
METHODS = {
    "widen": {},
    "task_arithmetic": {"weight": "0.7,0.4"},
    "ties": {"density": "0.5"},
    "dare_ties": {"density": "0.6", "seed": "3"},
    "breadcrumbs": {"density": "0.6", "gamma": "0.05"},
    "model_stock": {},
    "linear": {},
}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("fam"), "tiny", dtype="bf16")


def _merge(fam, out: Path, method: str, **options) -> dict[str, torch.Tensor]:
    api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, method, METHODS[method], **options)
    return load_file(str(out / "model.safetensors"))


# ----------------------------------------------------------------------------------------- resolution, errors


def test_auto_is_the_cpu_without_cuda_and_the_plan_says_which(fam, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", device="auto")
    assert p.to_dict()["device"] == "cpu" and "predicted_peak_vram" not in p.to_dict()


@pytest.mark.parametrize("spec, message", [
    ("cuda", "use --device cpu"), ("cuda:0", "use --device cpu"), ("cuda:x", "cuda:N"), ("tpu", "choose auto, cpu"),
])
def test_unusable_devices_are_refused_before_anything_is_written(fam, tmp_path, monkeypatch, spec, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=message):
        resolve_device(spec)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model",
                                  str(fam["multilingual"]), "--out", str(out), "--device", spec, "-q"])
    assert r.exit_code == 1 and message in r.output and f"--device {spec}" in r.output
    assert not out.exists() and not list(tmp_path.glob("*.streammerge-partial"))


def test_a_malformed_max_vram_is_refused_even_on_the_cpu():
    with pytest.raises(Exception, match="--max-vram"):
        make_budget("1GiB", "cpu", "lots")
    assert make_budget("1GiB", "cpu", "8GiB").max_vram is None  # no GPU: nothing to budget


def test_the_kind_of_device_is_part_of_the_fingerprint(fam, tmp_path):
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", device="cpu")
    doc = dict(p.fingerprint_doc)
    assert doc["engine"]["device"] == "cpu"
    assert describe_changes(doc, {**doc, "engine": {**doc["engine"], "device": "cuda"}}) == ["device: cpu -> cuda"]


def test_plan_summary_says_which_tensors_are_read_once(fam, tmp_path):
    args = ["plan", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model", str(fam["multilingual"]),
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    text = CliRunner().invoke(main, args).output
    assert "device      cpu" in text and "with statistics passes are read once" in text
    d = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert d["read_once"] > 0 and d["read_per_pass"] == 0  # the tiny family fits whole
    assert "chunks      every tensor in one chunk" in text
    assert "tensor(s) in row chunks (the most: " in CliRunner().invoke(main, [*args, "--max-ram", "600KiB"]).output
    chunked = json.loads(CliRunner().invoke(main, [*args, "--json", "--max-ram", "600KiB"]).output)
    assert chunked["read_per_pass"] > 0
    assert all(t["reads"] in (1, t["passes"]) for t in chunked["tensors"])


def _gpu_plan(fam, tmp_path, max_vram: int, max_ram: int = 1 << 30):
    """A plan for a CUDA device, made without one (planning reads headers only)."""
    recipe = Recipe(fam["base"], (fam["chat"], fam["multilingual"]), tmp_path / "out", "widen")
    return make_plan(recipe, load_checkpoint(fam["base"]), [load_checkpoint(fam[m]) for m in ("chat", "multilingual")],
                     Budget(max_ram, "test", "cuda:0", max_vram, "test"))


def test_the_vram_budget_sizes_gpu_chunks(fam, tmp_path):
    roomy = _gpu_plan(fam, tmp_path, 1 << 30)
    assert all(t.chunk_rows == t.rows for t in roomy.tensors)
    tight = _gpu_plan(fam, tmp_path, 1024 * 1024)
    assert 0 < tight.peak_vram <= 1024 * 1024 and any(t.chunk_rows < t.rows for t in tight.tensors)
    assert tight.fingerprint == roomy.fingerprint  # the budget never changes the output
    # on the GPU a chunk is computed whole: one kernel per operation
    assert all(t.block_rows == t.chunk_rows == t.stat_block_rows for t in tight.tensors)
    assert tight.to_dict()["predicted_peak_vram"] == tight.peak_vram
    with pytest.raises(PlanError, match=r"--max-vram .* too small: .* raise --max-vram, or use --device cpu"):
        _gpu_plan(fam, tmp_path, 4096)


# ------------------------------------------------------------------- an accelerator's staging path, on the CPU


class StandInAccelerator(CpuCompute):
    """Behaves like the CUDA path: inputs are copied away (so their slot goes back to the reader at once), the
    result is formed in a separate tensor and copied into the host buffer afterwards."""

    uploads = 0

    def __init__(self) -> None:
        super().__init__(copies=True)  # a class attribute would be overwritten by the dataclass __init__

    def upload(self, inputs):
        StandInAccelerator.uploads += 1
        return [x.clone() for x in inputs]

    def output_like(self, host):
        return torch.full_like(host, 7) if host.is_floating_point() else torch.empty_like(host)

    def download(self, result, host):
        host.copy_(result)


@pytest.mark.parametrize("method", ["widen", "ties", "dare_ties", "model_stock"])
def test_the_accelerator_staging_path_gives_the_same_bytes(fam, tmp_path, monkeypatch, method):
    want = _merge(fam, tmp_path / "cpu", method, device="cpu", chunk_rows=16)
    monkeypatch.setattr(streammerge.execute, "make_compute", lambda device: StandInAccelerator())
    for rows in (16, None):  # chunked (stats read per pass) and whole tensors (read once, kept for every pass)
        StandInAccelerator.uploads = 0
        got = _merge(fam, tmp_path / f"staged-{rows}", method, device="cpu", chunk_rows=rows)
        assert StandInAccelerator.uploads > 0, "the staging path was not taken"
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


# ---------------------------------------------------------------------------------------------- a real GPU

gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device (the CPU path is tested everywhere)")


@gpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cpu_and_gpu_agree_within_float_tolerance(fam, tmp_path, method):
    cpu = _merge(fam, tmp_path / "cpu", method, device="cpu")
    cuda = _merge(fam, tmp_path / "cuda", method, device="cuda")
    assert sorted(cpu) == sorted(cuda)
    for name, c in cpu.items():
        g = cuda[name]
        assert g.dtype == c.dtype and g.shape == c.shape
        # one bf16 step (2^-8 relative) where float64 statistics or ranks differ in their last bits
        assert torch.allclose(g.float(), c.float(), rtol=2**-7, atol=1e-3), name


@gpu
@pytest.mark.parametrize("method", ["widen", "ties", "dare_ties"])
def test_gpu_output_is_the_same_for_every_chunking(fam, tmp_path, method):
    _merge(fam, tmp_path / "whole", method, device="cuda")
    ref = (tmp_path / "whole" / "model.safetensors").read_bytes()
    for rows in (1, 7, 64):
        _merge(fam, tmp_path / f"r{rows}", method, device="cuda", chunk_rows=rows)
        assert (tmp_path / f"r{rows}" / "model.safetensors").read_bytes() == ref, rows


@gpu
def test_gpu_memory_stays_within_max_vram(fam, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", "widen", device="cuda",
                 max_vram="1MiB")
    assert p.peak_vram <= 1024 * 1024 and any(t.chunk_rows < t.rows for t in p.tensors)
    _merge(fam, tmp_path / "out", "widen", device="cuda", max_vram="1MiB")
    assert torch.cuda.max_memory_allocated() - base <= 1024 * 1024


@gpu
def test_merge_json_reports_the_peak_gpu_memory(fam, tmp_path):
    r = CliRunner().invoke(main, ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model",
                                  str(fam["multilingual"]), "--out", str(tmp_path / "out"), "--device", "cuda",
                                  "--max-vram", "1MiB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["device"].startswith("cuda") and 0 < d["peak_vram"]
