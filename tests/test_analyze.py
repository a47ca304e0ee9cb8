"""``streammerge analyze``: every figure against a dense computation on tiny models, the same figures for every
chunking, the JSON document, the verdict, the plot, and errors (bad inputs are refused as a merge refuses them)."""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.analysis import DEFINITIONS, SCHEMA, Analysis
from streammerge.analysis.figures import QUANTILES, module_kind
from streammerge.analysis.plot import size_px
from streammerge.analysis.stats import top_k_count
from streammerge.cli import main
from streammerge.errors import IncompatibleModelsError, NonFiniteError, StreamMergeError
from streammerge.examples import write_family
from streammerge.methods import Rule

N3 = (("chat", 0.1), ("multilingual", 0.3), ("code", 0.15))


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = Path(dirpath, name).stat()
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tied Qwen2-shaped family in bf16: base and three variants of different delta sizes."""
    return write_family(tmp_path_factory.mktemp("analyze") / "fam", "tiny", dtype="bf16", variants=N3)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untied family in float32 (an lm_head of its own)."""
    return write_family(tmp_path_factory.mktemp("analyze") / "untied", "tiny-untied", dtype="fp32")


def models_of(fam: dict[str, Path]) -> list[Path]:
    return [p for name, p in fam.items() if name != "base"]


def edited_copy(model: Path, to: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the model folder ``model`` at ``to`` whose tensors ``edit`` changed in place."""
    shutil.copytree(model, to)
    tensors = load_file(to / "model.safetensors")
    edit(tensors)
    save_file(tensors, to / "model.safetensors")
    return to


def without_run(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "run"}


# ---------------------------------------------------------------------------------------------- dense reference
def dense_columns(name: str, b: torch.Tensor, ms: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """WIDEN's column divergences (magnitude, direction) per model, whole-tensor float64; None for 1-D."""
    if b.dim() < 2:
        return None
    by_rows = name == "model.embed_tokens.weight"
    dim = 1 if by_rows else 0
    ssb = (b * b).sum(dim)
    out = []
    for m in ms:
        ssm, dot = (m * m).sum(dim), (m * b).sum(dim)
        out.append(((ssm.sqrt() - ssb.sqrt()).abs().numpy(), (1 - dot / (ssm * ssb).sqrt()).numpy()))
    return out


def dense_top(a: torch.Tensor, k: int) -> set[int]:
    """Indices of the k largest values of float32 ``a`` (flattened), ties to the lower index."""
    flat = a.reshape(-1).numpy()
    order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))
    return set(order[:k].tolist())


class Dense:
    """The raw sums of a tensor or a group, computed from whole tensors."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.elements, self.ssb = 0, 0.0
        self.ssd, self.sabs, self.zeros = [0.0] * n, [0.0] * n, [0] * n
        pairs = n * (n - 1) // 2
        self.dots, self.both, self.opp, self.overlap = [0.0] * pairs, [0] * pairs, [0] * pairs, [0] * pairs
        self.k = [0] * pairs  # per pair: Σ k over the tensors where both models changed at least k elements
        self.mag: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.dir: list[list[np.ndarray]] = [[] for _ in range(n)]

    def add_tensor(self, name: str, b32: torch.Tensor, m32s: list[torch.Tensor], top_k: float) -> None:
        b = b32.double()
        ms = [m.double() for m in m32s]
        ds = [m - b for m in ms]
        self.elements += b.numel()
        self.ssb += float((b * b).sum())
        for k, d in enumerate(ds):
            self.ssd[k] += float((d * d).sum())
            self.sabs[k] += float(d.abs().sum())
            self.zeros[k] += int((d == 0).sum())
        k_top = max(1, (b.numel() * int(top_k) + 50) // 100) if top_k else 0
        tops = [dense_top((m - b32).abs(), k_top) for m in m32s] if k_top else []
        changed = [int((d != 0).sum()) for d in ds]
        p = 0
        for i in range(len(ds)):
            for j in range(i + 1, len(ds)):
                self.dots[p] += float((ds[i] * ds[j]).sum())
                self.both[p] += int(((ds[i] != 0) & (ds[j] != 0)).sum())
                self.opp[p] += int(((ds[i] > 0) & (ds[j] < 0) | (ds[i] < 0) & (ds[j] > 0)).sum())
                if tops and changed[i] >= k_top and changed[j] >= k_top:
                    self.k[p] += k_top
                    self.overlap[p] += len(tops[i] & tops[j])
                p += 1
        cols = dense_columns(name, b, ms)
        if cols:
            for k, (mag, direction) in enumerate(cols):
                self.mag[k].append(mag)
                self.dir[k].append(direction)


def close(a: float | None, b: float | None, rel: float = 1e-9, abs_: float = 1e-12) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def check_summary(got, values: list[np.ndarray], exact: bool) -> None:
    """A column summary against the dense values (a group's quantiles come from float32-rounded values)."""
    allv = np.concatenate(values)
    defined = allv[~np.isnan(allv)]
    assert got.columns == defined.size and got.undefined == allv.size - defined.size
    if not defined.size:
        assert got.mean is None and got.p50 is None
        return
    qs = np.quantile(defined if exact else defined.astype(np.float32).astype(np.float64), QUANTILES)
    assert close(got.mean, float(defined.mean()), 1e-9)
    assert close(got.max, float(defined.max()), 1e-9)
    for g, q in zip((got.p50, got.p90, got.p99), qs):
        assert close(g, float(q), 1e-9 if exact else 1e-6, 1e-12), (g, q)


def check_figures(got, ref: Dense, exact_quantiles: bool) -> None:
    assert got.elements == ref.elements
    assert close(got.base_norm, math.sqrt(ref.ssb))
    for k, m in enumerate(got.models):
        assert m.model == k + 1
        assert close(m.delta_norm, math.sqrt(ref.ssd[k]))
        assert close(m.relative_change, math.sqrt(ref.ssd[k]) / math.sqrt(ref.ssb))
        assert close(m.mean_abs_change, ref.sabs[k] / ref.elements)
        assert m.unchanged == ref.zeros[k] / ref.elements
        if ref.mag[k]:
            check_summary(m.magnitude, ref.mag[k], exact_quantiles)
            check_summary(m.direction, ref.dir[k], exact_quantiles)
        else:
            assert m.magnitude is None and m.direction is None
    pairs = [(i + 1, j + 1) for i in range(ref.n) for j in range(i + 1, ref.n)]
    assert [p.models for p in got.pairs] == pairs
    for p, pair in enumerate(got.pairs):
        i, j = pair.models[0] - 1, pair.models[1] - 1
        assert close(pair.cosine, ref.dots[p] / math.sqrt(ref.ssd[i] * ref.ssd[j]))
        assert pair.changed_by_both == ref.both[p] and pair.opposite_signs == ref.opp[p]
        assert pair.sign_conflict == ref.opp[p] / ref.both[p]
        assert pair.top_k == ref.k[p] and pair.in_both_top_k == ref.overlap[p]
        assert pair.top_k_overlap == (ref.overlap[p] / ref.k[p] if ref.k[p] else None)


def dense_analysis(fam: dict[str, Path], top_k: float = 10.0) -> dict[str, Dense]:
    """Dense sums per tensor, per layer, per module kind and for the whole model."""
    base = load_file(fam["base"] / "model.safetensors")
    models = [load_file(p / "model.safetensors") for p in models_of(fam)]
    n = len(models)
    out: dict[str, Dense] = {}
    for name, b in base.items():
        d = Dense(n)
        rule = Rule.EMBEDDING if name == "model.embed_tokens.weight" else Rule.MATRIX if b.dim() == 2 else Rule.VECTOR
        args = (name, b.float(), [m[name].float() for m in models], top_k)
        d.add_tensor(*args)
        out[name] = d
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        for key in ([f"layer {layer}"] if layer else []) + [module_kind(name, rule), "model"]:
            out.setdefault(key, Dense(n)).add_tensor(*args)
    return out


def test_every_figure_matches_a_dense_computation(fam):
    a = streammerge.analyze(fam["base"], models_of(fam), max_ram="1GiB")
    ref = dense_analysis(fam)
    assert {t.name for t in a.tensors} == set(load_file(fam["base"] / "model.safetensors"))
    for t in a.tensors:
        check_figures(t, ref[t.name], exact_quantiles=True)
    assert [g.name for g in a.layers] == ["layer 0", "layer 1"]
    for g in (*a.layers, *a.modules):
        check_figures(g, ref[g.name], exact_quantiles=False)
    assert {g.name for g in a.modules} == {"embedding", "attention", "mlp", "norm"}
    check_figures(a.model, ref["model"], exact_quantiles=False)
    assert a.model.tensors == len(a.tensors) and a.skipped == ()


def test_columns_follow_widens_rule_per_tensor(fam):
    a = streammerge.analyze(fam["base"], [fam["chat"], fam["code"]], top_k=0)
    emb = a.tensor("model.embed_tokens.weight")
    q = a.tensor("model.layers.0.self_attn.q_proj.weight")
    norm = a.tensor("model.layers.0.input_layernorm.weight")
    assert (emb.rule, emb.column, emb.model(1).magnitude.columns) == ("embedding", "stored row", emb.shape[0])
    assert (q.rule, q.column, q.model(1).direction.columns) == ("matrix", "stored column", q.shape[1])
    assert norm.column is None and norm.model(1).magnitude is None
    assert (emb.module, q.module, norm.module, q.layer, emb.layer) == ("embedding", "attention", "norm", 0, None)
    assert all(p.top_k_overlap is None and p.top_k == 0 for p in a.model.pairs)


@pytest.mark.parametrize("chunk_rows", [3, 7])
def test_every_figure_is_the_same_for_every_chunking(fam, chunk_rows):
    whole = streammerge.analyze(fam["base"], models_of(fam))
    chunked = streammerge.analyze(fam["base"], models_of(fam), chunk_rows=chunk_rows)
    assert without_run(chunked.to_json()) == without_run(whole.to_json())


def test_an_untied_head_is_a_matrix_and_the_budget_changes_nothing(untied):
    a = streammerge.analyze(untied["base"], models_of(untied), max_ram="64MiB")
    head = a.tensor("lm_head.weight")
    assert (head.module, head.rule, head.column) == ("head", "matrix", "stored column")
    ref = dense_analysis(untied)
    check_figures(head, ref["lm_head.weight"], exact_quantiles=True)
    small = streammerge.analyze(untied["base"], models_of(untied), chunk_rows=5)
    assert without_run(small.to_json()) == without_run(a.to_json())


# ---------------------------------------------------------------------------------------------- hand-made inputs
def write_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "vocab_size": 6, "num_hidden_layers": 1}))
    return folder


def test_ties_in_the_top_k_go_to_the_lower_index_and_zero_columns_have_no_direction(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=g)
    steps = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5])  # many exact ties in |Δ|
    emb = torch.randn(6, 4, generator=g)
    emb[2] = 0  # a token whose base row is zero: no direction
    base = {"model.layers.0.mlp.up_proj.weight": w, "model.embed_tokens.weight": emb}
    fams = {"base": write_folder(tmp_path / "base", base)}
    for k in (1, 2):
        pick = torch.randint(0, 5, (10, 8), generator=g)
        fams[f"m{k}"] = write_folder(tmp_path / f"m{k}", {
            "model.layers.0.mlp.up_proj.weight": w + steps[pick],
            "model.embed_tokens.weight": emb + torch.randn(6, 4, generator=g) * (emb != 0)})
    for top_k in (30.0, 12.5):
        a = streammerge.analyze(fams["base"], [fams["m1"], fams["m2"]], top_k=top_k, chunk_rows=3)
        ref = dense_analysis(fams, top_k)
        for t in a.tensors:
            check_figures(t, ref[t.name], exact_quantiles=True)
        up = a.tensor("model.layers.0.mlp.up_proj.weight")
        assert up.pairs[0].top_k == top_k_count(top_k, 80)
    emb_figures = a.tensor("model.embed_tokens.weight")
    assert emb_figures.model(1).direction.undefined == 1 and emb_figures.model(1).direction.columns == 5


def test_top_k_count():
    assert [top_k_count(10, n) for n in (1, 4, 5, 14, 15, 100)] == [1, 1, 1, 1, 2, 10]
    assert top_k_count(0, 100) == 0 and top_k_count(100, 7) == 7 and top_k_count(12.5, 4) == 1


def test_a_nan_in_an_input_is_named(tmp_path, fam):
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.mlp.up_proj.weight"][5, 3] = float("nan")

    bad = edited_copy(fam["chat"], tmp_path / "bad", poison)
    with pytest.raises(NonFiniteError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight of model 2 contains NaN "
                                             r"or infinity \(first in row 5\)"):
        streammerge.analyze(fam["base"], [fam["code"], bad])


# ---------------------------------------------------------------------------------------------- verdict
def test_the_verdict_names_a_pt_like_gap_as_the_papers_claim(fam):
    a = streammerge.analyze(fam["base"], [fam["chat"], fam["multilingual"]])
    v = a.verdict
    assert v.largest == 2 and v.smallest == 1 and v.change_ratio == pytest.approx(
        a.weights.model(2).relative_change / a.weights.model(1).relative_change)
    assert v.change_ratio > 2.5
    text = " ".join(v.findings)
    assert "model 2" in text and f"{v.change_ratio:.1f}×" in text and "WIDEN paper" in text and "2408.03092" in text
    assert v.suggestions[0].startswith("widen")
    assert "quality is not measured" in v.caveat.lower()


def test_the_verdict_compares_the_weights_not_the_norms(fam, tmp_path):
    """A model that changed its norm weights far more than another, and its matrices alike: no gap (the whole-model
    figure, where norms near 1 weigh in ‖B‖, would say otherwise); the weights group matches a dense computation."""
    base = load_file(fam["base"] / "model.safetensors")
    normed = edited_copy(fam["chat"], tmp_path / "normed",
                         lambda t: t.update({name: base[name] * 1.5 for name in t if "norm" in name}))
    a = streammerge.analyze(fam["base"], [fam["chat"], normed])
    whole = a.model.model(2).relative_change / a.model.model(1).relative_change
    assert whole > 2.5 and a.verdict.change_ratio < 1.5 and "similar size" in a.verdict.findings[0]
    ref = Dense(2)
    for name, b in base.items():
        if b.dim() >= 2 and "norm" not in name:
            ref.add_tensor(name, b.float(), [load_file(m / "model.safetensors")[name].float() for m in
                                             (fam["chat"], normed)], 10.0)
    check_figures(a.weights, ref, exact_quantiles=False)


def test_the_verdict_for_similar_changes(fam):
    a = streammerge.analyze(fam["base"], [fam["chat"], fam["code"]])
    assert a.verdict.change_ratio < 2.5
    assert "similar size" in a.verdict.findings[0]
    assert any("task_arithmetic" in s for s in a.verdict.suggestions)


def scaled_copy(fam: dict[str, Path], variant: str, scale: float, to: Path) -> Path:
    """The variant with its delta from the base times ``scale`` (computed in float32, stored as bfloat16)."""
    base = load_file(fam["base"] / "model.safetensors")
    return edited_copy(fam[variant], to, lambda t: t.update(
        {k: (base[k].float() + scale * (v.float() - base[k].float())).to(v.dtype) for k, v in t.items()}))


def test_a_stronger_copy_of_the_same_change_is_no_pt_like_gap(fam, tmp_path):
    """A model whose change is another's, three times longer: a ratio above the gap, but the same direction; the
    verdict says so, and does not quote the paper's FT + PT claims (what would the larger change lose?)."""
    a = streammerge.analyze(fam["base"], [fam["chat"], scaled_copy(fam, "chat", 3.0, tmp_path / "chat3")])
    v = a.verdict
    assert v.change_ratio > 2.5 and a.weights.pairs[0].cosine > 0.99
    assert "in the same direction" in v.findings[0] and "not a different kind of training" in v.findings[0]
    assert not any("likely to lose" in s for s in v.suggestions) and "lost both abilities" not in v.findings[0]


def test_a_gap_between_two_changes_within_the_ft_band_is_hedged(fam, tmp_path):
    """Unrelated changes with a ratio above the gap, both within the paper's FT band (mean |Δ| up to 0.002): maybe
    two fine-tunes of different strength, said so, without the paper's FT + PT merging results."""
    small = scaled_copy(fam, "chat", 0.2, tmp_path / "chat-small")
    code = scaled_copy(fam, "code", 0.7, tmp_path / "code")
    a = streammerge.analyze(fam["base"], [small, code])
    v = a.verdict
    assert v.change_ratio > 2.5 and abs(a.weights.pairs[0].cosine) < 0.1
    assert max(m.mean_abs_change for m in a.weights.models) <= 0.002
    assert "within the paper's FT band" in v.findings[0] and "two fine-tunes of different strength" in v.findings[0]
    assert "lost both abilities" not in v.findings[0] and v.suggestions[0].startswith("widen")


def test_a_model_identical_to_the_base_and_a_single_model(fam):
    a = streammerge.analyze(fam["base"], [fam["base"], fam["chat"]])
    assert a.model.model(1).relative_change == 0 and a.model.model(1).unchanged == 1.0
    assert any("identical to the base" in f for f in a.verdict.findings)
    assert a.model.pairs[0].cosine is None and a.model.pairs[0].sign_conflict is None
    # model 1 changed nothing: its "top k" would be elements picked by index, so no overlap is claimed
    assert a.model.pairs[0].top_k_overlap is None and a.model.pairs[0].top_k == 0
    assert all(t.pairs[0].top_k_overlap is None for t in a.tensors)
    one = streammerge.analyze(fam["base"], fam["multilingual"])
    assert one.model.pairs == () and one.top_k == 0 and "For scale" in one.verdict.findings[-1]


@pytest.mark.parametrize("name, kind", [
    ("model.layers.3.self_attn.q_proj.weight", "attention"), ("model.layers.3.post_attention_layernorm.weight", "norm"),
    ("model.layers.3.self_attn.q_norm.weight", "norm"), ("model.layers.0.mlp.experts.gate_up_proj", "mlp"),
    ("model.layers.0.mlp.gate.weight", "mlp"), ("gpt_neox.layers.1.attention.dense.weight", "attention"),
    ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "mlp"), ("h.0.ln_1.weight", "norm"), ("ln_f.weight", "norm"),
    ("h.0.attn.c_attn.weight", "attention"), ("h.0.mlp.c_fc.weight", "mlp"), ("lm_head.weight", "head"),
    ("model.norm.weight", "norm"), ("model.visual.blocks.0.attn.qkv.weight", "vision"),
    ("transformer.wpe.weight", "embedding"), ("model.layers.0.something.weight", "other")])
def test_module_kinds(name, kind):
    assert module_kind(name, Rule.MATRIX) == kind


# ---------------------------------------------------------------------------------------------- JSON and CLI
def test_the_json_document(fam):
    result = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"],
                    "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    json.dumps(d, allow_nan=False)  # no NaN or infinity anywhere
    assert d["schema"] == SCHEMA and d["definitions"] == DEFINITIONS
    assert set(d) == {"schema", "streammerge", "base", "models", "options", "device", "definitions", "model",
                      "weights", "modules", "layers", "tensors", "skipped", "verdict", "run", "notes"}
    assert d["options"] == {"top_k_percent": 10.0, "quantiles": list(QUANTILES)}
    figure_keys = {"name", "tensors", "elements", "base_norm", "models", "pairs"}
    model_keys = {"model", "relative_change", "delta_norm", "mean_abs_change", "unchanged",
                  "column_magnitude_divergence", "column_direction_divergence"}
    pair_keys = {"models", "cosine", "sign_conflict", "changed_by_both", "opposite_signs", "top_k_overlap", "top_k",
                 "in_both_top_k"}
    summary_keys = {"columns", "undefined", "mean", "p50", "p90", "p99", "max"}
    groups = [d["model"], d["weights"], *d["modules"], *d["layers"], *d["tensors"]]
    for g in groups:
        assert figure_keys <= set(g)
        assert [m["model"] for m in g["models"]] == [1, 2] and [p["models"] for p in g["pairs"]] == [[1, 2]]
        for m in g["models"]:
            assert set(m) == model_keys
            for key in ("column_magnitude_divergence", "column_direction_divergence"):
                assert m[key] is None or set(m[key]) == summary_keys
        assert all(set(p) == pair_keys for p in g["pairs"])
    assert all(set(t) == figure_keys | {"shape", "rule", "module", "layer", "column"} for t in d["tensors"])
    assert [g["layer"] for g in d["layers"]] == [0, 1]
    assert set(d["verdict"]) == {"findings", "suggestions", "change_ratio", "largest_change", "smallest_change",
                                 "gap_threshold", "caveat"}
    assert set(d["run"]) == {"tensors", "seconds", "bytes_read", "peak_rss", "peak_vram"}
    api = streammerge.analyze(fam["base"], [fam["chat"], fam["multilingual"]])
    assert isinstance(api, Analysis)
    assert without_run(json.loads(json.dumps(api.to_json()))) == without_run(d) | {"base": d["base"]}


def test_the_table(fam):
    result = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"],
                    "--tensors", "-q")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for part in ("whole model", "‖Δ‖/‖B‖ (relative change)", "by module kind", "by layer", "by tensor",
                 "model.layers.1.mlp.down_proj.weight", "verdict", "suggested methods", "quality is not measured"):
        assert part in out, part
    assert result.stderr == ""


def test_nothing_is_written_into_the_model_folders(fam, tmp_path):
    pytest.importorskip("matplotlib")
    before = snapshot(fam["base"].parent)
    result = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--plot", tmp_path / "p.png", "-q")
    assert result.exit_code == 0, result.output
    assert snapshot(fam["base"].parent) == before
    inside = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--plot", fam["chat"] / "p.png")
    assert inside.exit_code == 1 and "inside the input folder" in inside.stderr
    assert snapshot(fam["base"].parent) == before


# ---------------------------------------------------------------------------------------------- plot
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("models", [("chat", "multilingual", "code"), ("chat",)])
def test_the_plot_renders(fam, tmp_path, models):
    pytest.importorskip("matplotlib")
    path = tmp_path / "changes.png"
    a = streammerge.analyze(fam["base"], [fam[m] for m in models], plot=path)
    assert path.is_file() and path.stat().st_size > 20_000
    assert png_size(path) == size_px(a) == (1000, 260 * (4 if len(models) > 1 else 1) + 90)


def test_the_plot_without_matplotlib_names_the_extra_before_reading_anything(fam, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    from streammerge.analysis import core

    monkeypatch.setattr(core, "run_statistics", lambda *a, **k: pytest.fail("the analysis ran"))
    result = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--plot", tmp_path / "p.png")
    assert result.exit_code == 1
    assert "needs matplotlib, which is not installed: pip install 'streammerge[plot]'" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_a_plot_file_of_another_format_is_refused_and_svg_and_pdf_are_written(fam, tmp_path):
    result = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--plot", tmp_path / "p.jpg")
    assert result.exit_code == 1 and "ending in .png, .svg or .pdf" in result.stderr
    missing = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--plot", tmp_path / "no" / "p.png")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    for name, magic in (("p.svg", b"<?xml"), ("p.pdf", b"%PDF")):
        done = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--plot", tmp_path / name, "-q")
        assert done.exit_code == 0 and (tmp_path / name).read_bytes().startswith(magic)


def test_a_missing_folder_written_as_a_path_is_not_looked_up_on_the_hub(fam, tmp_path, monkeypatch):
    """``./demo/nope`` names a folder, not the Hub ID ``demo/nope``: refused by name before any lookup."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = invoke("analyze", "--base", fam["base"], "--model", "./demo/nope")
    assert result.exit_code == 1 and str(tmp_path / "here" / "demo" / "nope") in result.stderr
    assert "Hub" not in result.stderr
    merge = invoke("merge", "--base", "../nope", "--model", fam["chat"], "--out", tmp_path / "out")
    assert merge.exit_code == 1 and f"model folder {tmp_path / 'nope'} does not exist" in merge.stderr
    assert "Hub" not in merge.stderr


# ---------------------------------------------------------------------------------------------- bad input
def test_mismatched_models_get_the_checks_of_a_merge(fam, tmp_path):
    other = write_family(tmp_path / "other", "tiny-llama", dtype="bf16", variants=())["base"]
    for models in ([fam["chat"], other], [fam["chat"], tmp_path / "missing"]):
        args = ["--base", fam["base"], *(x for m in models for x in ("--model", m))]
        analyzed = invoke("analyze", *args)
        planned = invoke("plan", *args)
        assert analyzed.exit_code == planned.exit_code == 1
        assert analyzed.stderr == planned.stderr
    with pytest.raises(IncompatibleModelsError, match="'llama' model but the base"):
        streammerge.analyze(fam["base"], other)


def test_a_changed_shape_and_an_extra_tensor_are_refused_with_the_merge_messages(fam, tmp_path):
    bad = edited_copy(fam["chat"], tmp_path / "bad", lambda t: t.update(
        {"model.norm.weight": torch.ones(65, dtype=torch.bfloat16), "extra.weight": torch.ones(2, dtype=torch.bfloat16)}))
    args = ["--base", fam["base"], "--model", fam["code"], "--model", bad]
    result = invoke("analyze", *args)
    assert result.exit_code == 1 and "shape [65] in model 2" in result.stderr
    assert result.stderr == invoke("plan", *args).stderr
    excluded = streammerge.analyze(fam["base"], [fam["chat"]], exclude=[r"model\.norm"])
    assert ("model.norm.weight", "--exclude") in excluded.skipped


def test_bad_options(fam):
    result = invoke("analyze", "--base", fam["base"], "--model", fam["chat"], "--top-k", "150")
    assert result.exit_code == 2 and "--top-k" in result.stderr
    with pytest.raises(StreamMergeError, match="top_k=150.0 must be a percentage"):
        streammerge.analyze(fam["base"], fam["chat"], top_k=150)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_rams'"):
        streammerge.analyze(fam["base"], fam["chat"], max_rams="1GiB")
    with pytest.raises(StreamMergeError, match=r"exclude=\['model'\]|matches no tensor"):
        streammerge.analyze(fam["base"], fam["chat"], exclude=["nothing-like-this"])
    assert invoke("analyze", "--base", fam["base"]).exit_code == 2


def test_analyze_help_imports_neither_torch_nor_matplotlib():
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "streammerge", "analyze", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "streammerge.analysis.command" in imported and not {"torch", "numpy", "matplotlib"} & imported
    assert "--top-k PERCENT" in r.stdout and "streammerge[plot]" in r.stdout


def widen_columns(b: torch.Tensor, m: torch.Tensor, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense WIDEN divergences for one model: ``layout`` rows (embedding, Conv1D), experts ([E, out, in]: each
    expert's columns) or columns (a matrix, or a kernel's [out, in·∏kernel] view)."""
    b, m = b.double(), m.double()
    if layout == "rows":
        dims, b, m = 1, b, m
    elif layout == "experts":
        dims = 1  # sum over each expert's out dim: (E, in) → E·in columns, expert by expert
    else:
        dims, b, m = 0, b.reshape(b.shape[0], -1), m.reshape(m.shape[0], -1)
    ssb, ssm, dot = (b * b).sum(dims), (m * m).sum(dims), (m * b).sum(dims)
    return (ssm.sqrt() - ssb.sqrt()).abs().reshape(-1).numpy(), (1 - dot / (ssm * ssb).sqrt()).reshape(-1).numpy()


def test_experts_kernels_and_conv1d_get_widens_columns(tmp_path):
    g = torch.Generator().manual_seed(1)
    shapes = {"h.0.attn.c_attn.weight": ((6, 9), "rows"), "h.0.mlp.experts.gate_up_proj": ((3, 4, 5), "experts"),
              "visual.patch_embed.proj.weight": ((4, 3, 2, 2), "columns"), "h.0.ln_1.weight": ((6,), None)}
    base = {name: torch.randn(shape, generator=g) for name, (shape, _) in shapes.items()}
    folders = []
    for k, scale in enumerate((0.0, 0.05, 0.2)):
        tensors = {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()}
        folder = tmp_path / f"m{k}"
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
        folders.append((folder, tensors))
    (b_folder, b_tensors), *models = folders
    a = streammerge.analyze(b_folder, [f for f, _ in models], top_k=25)
    for name, (shape, layout) in shapes.items():
        t = a.tensor(name)
        assert t.rule == {"rows": "conv1d", "experts": "tensor", "columns": "conv", None: "vector"}[layout]
        ref = Dense(2)
        ref.add_tensor(name, b_tensors[name], [m[name] for _, m in models], 25)
        if layout:
            for k, (_, m) in enumerate(models):
                mag, direction = widen_columns(b_tensors[name], m[name], layout)
                ref.mag[k], ref.dir[k] = [mag], [direction]
        else:
            ref.mag, ref.dir = [[], []], [[], []]
        check_figures(t, ref, exact_quantiles=True)
    assert a.tensor("h.0.mlp.experts.gate_up_proj").model(1).direction.columns == 15
    assert a.tensor("visual.patch_embed.proj.weight").module == "vision"
    for rows in (1, 2):
        again = streammerge.analyze(b_folder, [f for f, _ in models], top_k=25, chunk_rows=rows)
        assert without_run(again.to_json()) == without_run(a.to_json())
