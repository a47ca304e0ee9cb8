"""WIDEN end to end: the streaming engine (``streammerge.merge``) against the dense reference in reference_widen.py.

Tiny Qwen2-style model folders are written by hand (safetensors + config.json) in ``tmp_path``. The engine must
agree with the reference to 1e-6 (float32 storage), write the same bytes for every chunk size, keep dtypes as
asked, decide the above-average boundary exactly, and refuse bad requests before writing anything.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import assert_matches
from reference_widen import widen_reference
from safetensors.torch import load_file, save_file

from streammerge.api import merge, plan
from streammerge.errors import MethodError
from streammerge.methods.widen import rank_significance

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
Tensors = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------------------------
# Building model folders
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    hidden: int = 16
    intermediate: int = 24
    vocab: int = 33
    tied: bool = False


def shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Qwen2-style tensor names and shapes, one decoder layer."""
    h, i, p = d.hidden, d.intermediate, "model.layers.0."
    out = {
        EMBED: (d.vocab, h),
        Q: (h, h), p + "self_attn.q_proj.bias": (h,),
        p + "self_attn.k_proj.weight": (h, h), p + "self_attn.k_proj.bias": (h,),
        p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        p + "input_layernorm.weight": (h,), "model.norm.weight": (h,),
    }
    if not d.tied:
        out[HEAD] = (d.vocab, h)
    return out


def random_base(d: Dims, seed: int = 0) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes(d).items():
        x = torch.randn(shape, generator=g) * 0.02
        out[name] = x + 1.0 if "norm" in name else x
    return out


def variant(base: Tensors, seed: int, scale: float) -> Tensors:
    """``base`` plus noise whose size varies by column (and by token row for the embedding), like a fine-tune."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, b in base.items():
        per_col = torch.rand(b.shape[-1], generator=g) * 1.8 + 0.2
        if name == EMBED:
            per_col = per_col * (torch.rand(b.shape[0], 1, generator=g) * 1.8 + 0.2)
        out[name] = b + torch.randn(b.shape, generator=g) * per_col * (0.02 * scale)
    return out


def family(n_models: int, d: Dims = Dims(), seed: int = 0) -> tuple[Tensors, list[Tensors]]:
    base = random_base(d, seed)
    return base, [variant(base, seed + 100 + k, 0.1 * (k + 1)) for k in range(n_models)]


def save_model(folder: Path, tensors: Tensors, tied: bool, dtype: torch.dtype | None = None) -> Path:
    folder.mkdir(parents=True)
    stored = {n: (t if dtype is None else t.to(dtype)).contiguous() for n, t in tensors.items()}
    save_file(stored, str(folder / "model.safetensors"))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": tied,
              "torch_dtype": "bfloat16" if dtype is torch.bfloat16 else "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class Job:
    """Base and models saved under one folder; ``run`` merges them into a fresh output folder."""

    def __init__(self, root: Path, base: Tensors, models: list[Tensors], tied: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        self.root, self.base, self.models, self.tied = root, base, models, tied
        self.base_dir = save_model(root / "base", base, tied, dtype)
        self.model_dirs = [save_model(root / f"m{k}", m, tied, dtype) for k, m in enumerate(models)]
        self.runs = 0

    def run(self, params: dict | None = None, **options) -> Path:
        self.runs += 1
        out = self.root / f"out{self.runs}"
        merge(self.base_dir, self.model_dirs, out, method="widen", params=params or {}, **options)
        return out

    def reference(self, params: dict | None = None, **kwargs) -> Tensors:
        return widen_reference(self.base, self.models, **(params or {}), tied=self.tied, **kwargs)


def load(out: Path) -> Tensors:
    return load_file(str(out / "model.safetensors"))


def header_dtypes(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    raw = [x.contiguous().reshape(-1).view(torch.uint8) for x in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and raw[0].equal(raw[1])


def without(tensors: Tensors, name: str) -> Tensors:
    return {n: t for n, t in tensors.items() if n != name}


# --------------------------------------------------------------------------------------------------------------
# Engine vs reference
# --------------------------------------------------------------------------------------------------------------

SCENARIOS = {
    "2-models-untied": (2, Dims(), {}),
    "tied-no-head": (2, Dims(tied=True), {}),
    "odd-vocab-257": (2, Dims(hidden=17, vocab=257), {}),
    "odd-vocab-1001-tied": (2, Dims(hidden=17, vocab=1001, tied=True), {}),
    "3-models": (3, Dims(hidden=17, vocab=257), {}),
    "t0.5-s2": (2, Dims(hidden=17, vocab=257), {"t": 0.5, "s": 2.0}),
    "t1.5-s0.8": (3, Dims(vocab=49), {"t": 1.5, "s": 0.8}),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_matches_reference(tmp_path, scenario):
    n_models, dims, params = SCENARIOS[scenario]
    job = Job(tmp_path, *family(n_models, dims), tied=dims.tied)
    got = load(job.run(params))
    if dims.tied:
        assert HEAD not in got  # the input stored no head: neither does the output
    assert_matches(got, job.reference(params))


def zero_and_identical_columns(base: Tensors, models: list[Tensors]) -> None:
    """In place: zero/identical columns of q_proj (columns) and of the embedding (token rows)."""
    for name, col in ((Q, lambda x, j: x[:, j]), (EMBED, lambda x, j: x[j])):
        col(base[name], 0).zero_()  # zero in the base only: NaN direction, ranked most changed
        col(models[0][name], 1).zero_()  # zero in one model only
        for m in models:
            col(m[name], 2).copy_(col(base[name], 2))  # unchanged by every model: exactly 0 divergences
            col(m[name], 3).copy_(col(models[0][name], 3))  # identical across models, changed from the base
        for x in (base, *models):
            col(x[name], 4).zero_()  # zero everywhere: Δ = 0, shifts the other ranks
        for j in (5, 6):  # unchanged by model 1 only: its exact-0 ties rank by index and set model 2's softmax
            col(models[0][name], j).copy_(col(base[name], j))


def test_zero_and_identical_columns(tmp_path):
    base, models = family(2, Dims(hidden=17, vocab=257))
    zero_and_identical_columns(base, models)
    job = Job(tmp_path, base, models)
    got = load(job.run())
    assert all(torch.isfinite(t).all() for t in got.values())
    assert torch.equal(got[Q][:, 2], base[Q][:, 2]) and torch.equal(got[EMBED][4], base[EMBED][4])  # Δ = 0
    assert_matches(got, job.reference())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_ranks_put_every_nan_last_in_index_order(device):
    zero = torch.zeros(1, dtype=torch.float64)
    signed_nan = (zero / zero)[0]  # 0/0: the NaN a zero column gives, with its sign bit set on x86 and on CUDA
    d = torch.tensor([[3.0, float("inf"), 0.0, 1.0, 0.0, 5.0, float("-inf")],
                      [float("nan"), 5.0, 0.0, 1.0, 0.0, float("inf"), 3.0]], dtype=torch.float64)
    d[0, 2] = signed_nan
    d[1, 4] = signed_nan
    sigma, rank = rank_significance(d.to(device))
    assert rank.cpu().tolist() == [[3, 5, 6, 2, 1, 4, 0], [5, 3, 0, 1, 6, 4, 2]]
    assert torch.equal(sigma.cpu(), rank.cpu().to(torch.float32) / 7)


def test_exclude_keeps_base_bytes(tmp_path):
    job = Job(tmp_path, *family(2, Dims(hidden=17)))
    exclude = (r"model\.layers\.0\.mlp\.", r"model\.norm")
    got = load(job.run(exclude=exclude))
    kept = [n for n in job.base if n.startswith(("model.layers.0.mlp.", "model.norm"))]
    assert len(kept) == 4
    for name in kept:
        assert same_bytes(got[name], job.base[name]), name
    assert_matches(got, job.reference(exclude=exclude))


def stored_head_tied_config(root: Path) -> tuple[Job, Tensors]:
    """Every file stores lm_head (with different values) while config.json says tied; merged with defaults."""
    base, models = family(2, Dims(hidden=17, vocab=257))
    job = Job(root, base, models, tied=True)
    return job, load(job.run())


def test_stored_head_with_tied_config_merges_embedding_once(tmp_path):
    job, got = stored_head_tied_config(tmp_path)
    assert HEAD in got
    assert_matches(without(got, HEAD), without(job.reference(), HEAD))


def test_stored_head_with_tied_config_follows_embedding(tmp_path):
    _, got = stored_head_tied_config(tmp_path)
    assert same_bytes(got[HEAD], got[EMBED])


# --------------------------------------------------------------------------------------------------------------
# Chunking, dtypes
# --------------------------------------------------------------------------------------------------------------


def test_output_bytes_independent_of_chunk_rows(tmp_path):
    dims = Dims(hidden=67, intermediate=130, vocab=257)
    job = Job(tmp_path, *family(2, dims), dtype=torch.bfloat16)
    files = {rows: job.run(chunk_rows=rows) / "model.safetensors" for rows in (1, 7, 64, None)}
    budget = plan(job.base_dir, job.model_dirs, tmp_path / "unused", max_ram="500KiB", device="cpu")
    assert any(1 < t.chunk_rows < t.shape[0] for t in budget.tensors)  # the budget really splits tensors
    files["budget"] = job.run(max_ram="500KiB", device="cpu") / "model.safetensors"
    assert set(header_dtypes(files[1]).values()) == {"BF16"}
    reference = files[None].read_bytes()
    assert [k for k, f in files.items() if f.read_bytes() != reference] == []


def test_output_dtype_default_keeps_base_dtype_per_tensor(tmp_path):
    base, models = family(2)
    mixed = {n: t.to(torch.bfloat16 if t.dim() == 2 else torch.float32) for n, t in base.items()}
    mixed[EMBED] = mixed[EMBED].to(torch.float16)
    job = Job(tmp_path, mixed, [{n: t.to(mixed[n].dtype) for n, t in m.items()} for m in models])
    base_dtypes = header_dtypes(job.base_dir / "model.safetensors")
    assert set(base_dtypes.values()) == {"BF16", "F32", "F16"}

    default = job.run()
    assert header_dtypes(default / "model.safetensors") == base_dtypes
    assert json.loads((default / "config.json").read_text())["torch_dtype"] == "float32"  # the base's, untouched

    as_f32 = job.run(dtype="float32")
    assert set(header_dtypes(as_f32 / "model.safetensors").values()) == {"F32"}
    assert json.loads((as_f32 / "config.json").read_text())["torch_dtype"] == "float32"
    assert_matches(load(as_f32), job.reference())  # bf16/f16 inputs upcast exactly


def test_dtype_float32_rewrites_config(tmp_path):
    job = Job(tmp_path, *family(2), dtype=torch.bfloat16)
    default, as_f32 = job.run(), job.run(dtype="float32")
    assert json.loads((default / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert set(header_dtypes(default / "model.safetensors").values()) == {"BF16"}
    assert json.loads((as_f32 / "config.json").read_text())["torch_dtype"] == "float32"
    assert set(header_dtypes(as_f32 / "model.safetensors").values()) == {"F32"}


# --------------------------------------------------------------------------------------------------------------
# The above-average boundary
# --------------------------------------------------------------------------------------------------------------


def float32_rule_admits(n: int, t: float, rank: int) -> bool:
    """The official float32 test ``σ > t·mean(σ)`` for the natural order ``arange(n)/n``."""
    sigma = torch.arange(n, dtype=torch.float32) / n
    return bool(sigma[rank] > sigma.mean() * t)


def graded_columns(n: int, order: list[int]) -> torch.Tensor:
    """A 2 x n weight whose column j is the unit column (1, 0) scaled by 1 + 0.01(p+1) and rotated by 0.02(p+1)
    rad, p = order[j]: both its magnitude and its direction divergence from (1, 0) rank exactly p."""
    p = torch.tensor(order, dtype=torch.float64) + 1
    return torch.stack([torch.cos(0.02 * p), torch.sin(0.02 * p)]).mul(1 + 0.01 * p).to(torch.float32)


@pytest.mark.parametrize("n,t,float32_admits", [(49, 1.0, True), (49, 0.5, True), (25, 1.5, True), (5, 1.0, False)])
def test_boundary_rank_gets_softmax_score(tmp_path, n, t, float32_admits):
    """Column c of model 1 sits exactly at rank t(n−1)/2, i.e. on the model's mean significance: it is not above
    the mean, so it gets its softmax score, not s (for the first cases the float32 official rule would say s)."""
    boundary = round(t * (n - 1) / 2)
    assert 2 * boundary == t * (n - 1)
    assert float32_rule_admits(n, t, boundary) == float32_admits
    name = "model.layers.0.mlp.down_proj.weight"
    base = {name: torch.stack([torch.ones(n), torch.zeros(n)])}
    # Model 1 ranks its columns in reverse order; model 2 is the base (all divergences 0: ranks by index).
    m1 = {name: graded_columns(n, list(range(n - 1, -1, -1)))}
    job = Job(tmp_path, base, [m1, {name: base[name].clone()}])
    s = 3.0
    got = load(job.run({"t": t, "s": s}))[name]
    c = n - 1 - boundary  # model 1's rank of column c is the boundary rank
    expected_w = torch.softmax(torch.tensor([boundary / n, c / n], dtype=torch.float32), 0)[0]
    delta = m1[name][:, c] - base[name][:, c]
    w = (got[:, c] - base[name][:, c]) / delta
    assert torch.allclose(w, expected_w.expand(2), atol=1e-5), (w, expected_w)
    above = n - 1 - (boundary + 1)  # the column ranked one higher gets s
    w_above = (got[:, above] - base[name][:, above]) / (m1[name][:, above] - base[name][:, above])
    assert torch.allclose(w_above, torch.tensor([s, s]), atol=1e-5), w_above
    assert_matches({name: got}, job.reference({"t": t, "s": s}))


# --------------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------------


def test_single_model_is_refused(tmp_path):
    job = Job(tmp_path, *family(1))
    with pytest.raises(MethodError, match="at least 2"):
        job.run()
    assert not (tmp_path / "out1").exists()


def test_unknown_parameter_suggests_t(tmp_path):
    job = Job(tmp_path, *family(2))
    with pytest.raises(MethodError, match="did you mean 't'"):
        job.run({"tt": 1})
    assert not (tmp_path / "out1").exists()


def test_weights_do_not_depend_on_the_number_of_threads():
    """WIDEN's weights are bit-identical whatever torch's thread count (a resumed run may run on another machine)."""
    from streammerge.methods.widen import column_weights

    g = torch.Generator().manual_seed(0)
    n = 150_001
    ssb = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    ssm = ssb + torch.rand(2, n, generator=g, dtype=torch.float64) * 1e-3
    dot = (ssb * ssm).sqrt() * (1 - torch.rand(2, n, generator=g, dtype=torch.float64) * 1e-4)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(column_weights(ssb, ssm, dot, 1.0, 1.0))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert torch.equal(r, results[0])
