"""Vocabularies mapped through the tokenizers (``tokenizer_source``, ``tokenizer: {tokens, pad_to_multiple_of}``):
the union's order and files, every input's embedding and head rows against a dense reference written from
mergekit's ``PermutedVocabulary`` (mergekit 0.1.5, ``tokenizer/embed.py``), bytes that do not depend on the chunking,
the threads or an interruption, and what is refused. tests/test_mergekit_parity.py runs the same recipes through
mergekit itself when it is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import interrupt_merge_after_chunks, set_vocab_rows, write_tokenizer, write_vocabulary_family
from safetensors.torch import load_file

import streammerge
from streammerge.cli import main

V = 301  # the tiny-llama family's vocabulary
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
UNION = {"<|im_start|>": 301, "<|im_end|>": 302, "<vi>": 303}  # base's 301 tokens, then chat's, then multilingual's


def _vocab(folder: Path) -> dict[str, int]:
    doc = json.loads((folder / "tokenizer.json").read_text())
    return {**doc["model"]["vocab"], **{e["content"]: e["id"] for e in doc["added_tokens"]}}


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    write_vocabulary_family(root)
    return root


def reference_rows(voc: Path, names: list[str], out_vocab: dict[str, int], rows: int, tensor: str,
                   named_base: bool = True, tokens: dict | None = None) -> list[torch.Tensor]:
    """Each input's ``tensor`` permuted onto ``out_vocab`` as mergekit's PermutedVocabulary does, densely."""
    tokens = tokens or {}
    vocabs = [{t: i for t, i in _vocab(voc / n).items()} for n in names]
    data = [load_file(voc / n / "model.safetensors")[tensor] for n in names]
    vocabs = [{t: i for t, i in v.items() if i < d.shape[0]} for v, d in zip(vocabs, data)]
    defaults = {}
    for token, r in out_vocab.items():
        present = [k for k in range(len(names)) if token in vocabs[k]]
        cfg = tokens.get(token)
        if cfg is not None:
            kind = cfg.get("kind")
            if kind == "zero":
                defaults[token] = torch.zeros(data[0].shape[1])
            elif kind == "model":
                defaults[token] = data[cfg["input"]][vocabs[cfg["input"]][token]]
            else:
                k = cfg["input"]
                row = cfg.get("token_id", _vocab(voc / names[k]).get(cfg.get("token")))
                defaults[token] = data[k][row]
        elif len(present) == 1:
            defaults[token] = data[present[0]][vocabs[present[0]][token]]
        elif not present:
            defaults[token] = torch.zeros(data[0].shape[1])
        elif named_base and 0 in present:
            defaults[token] = data[0][vocabs[0][token]]
        else:
            defaults[token] = sum(data[k][vocabs[k][token]] for k in present) / len(present)
    out = []
    for k in range(len(names)):
        x = torch.zeros(rows, data[k].shape[1])
        for token, r in out_vocab.items():
            forced = tokens.get(token, {}).get("force")
            x[r] = data[k][vocabs[k][token]] if token in vocabs[k] and not forced else defaults[token]
        n_tokens = len(out_vocab)
        own = max(vocabs[k].values()) + 1
        mean = x[:n_tokens].double().mean(0).float()
        for r in range(n_tokens, rows):
            x[r] = data[k][r] if own <= r < data[k].shape[0] else mean
        out.append(x)
    return out


def _merge_recipe(tmp_path: Path, voc: Path, text: str, out: Path, *extra: str) -> Path:
    recipe = tmp_path / f"{out.name}.yml"
    recipe.write_text(text.format(root=voc))
    r = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out), "-q", *extra])
    assert r.exit_code == 0, r.output
    return out


TA = """merge_method: task_arithmetic
base_model: {root}/base
models:
  - model: {root}/chat
    parameters: {{weight: 0.7}}
  - model: {root}/multilingual
    parameters: {{weight: 0.5}}
dtype: float32
"""


def test_the_union_orders_new_tokens_by_input_and_writes_a_tokenizer_that_loads(voc, tmp_path):
    out = _merge_recipe(tmp_path, voc, TA + "tokenizer_source: union\n", tmp_path / "out")
    vocab = _vocab(out)
    assert {t: vocab[t] for t in UNION} == UNION and all(vocab[f"t{i}"] == i for i in range(V))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 304
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["303"]["content"] == "<vi>" and decoder["301"]["special"] is True
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("<vi> t5 <|im_start|>").ids == [303, 5, 301]
    tensors = load_file(out / "model.safetensors")
    assert all(tensors[n].shape == (304, 48) for n in VOCAB_TENSORS)


@pytest.mark.parametrize("chunk_rows,threads", [(3, 1), (7, 2), (None, 2)])
def test_union_task_arithmetic_matches_a_dense_reference_for_any_chunking(voc, tmp_path, chunk_rows, threads):
    extra = [*(["--chunk-rows", str(chunk_rows)] if chunk_rows else []), "--threads", str(threads)]
    out = _merge_recipe(tmp_path, voc, TA + "tokenizer_source: union\n", tmp_path / "out", *extra)
    got = load_file(out / "model.safetensors")
    out_vocab = _vocab(out)
    for name in VOCAB_TENSORS:
        base, chat, multi = reference_rows(voc, ["base", "chat", "multilingual"], out_vocab, 304, name)
        expected = base + 0.7 * (chat - base) + 0.5 * (multi - base)
        torch.testing.assert_close(got[name], expected, atol=2e-6, rtol=1e-5)
    if chunk_rows == 3:  # the bytes of every other chunking and thread count are these
        (tmp_path.parent / "union-ta.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    else:
        first = tmp_path.parent / "union-ta.safetensors"
        if first.exists():
            assert (out / "model.safetensors").read_bytes() == first.read_bytes()


@pytest.mark.parametrize("method", ["widen", "ties"])
def test_a_model_with_its_ids_shuffled_merges_to_the_same_bytes(voc, tmp_path, method):
    """multilingual is plain with its token ids shuffled (rows moved with them): mapped through the tokenizers,
    they are the same model, so WIDEN (statistics passes, a transposed embedding) and TIES give the same bytes."""
    text = ("merge_method: {method}\nbase_model: {{root}}/base\nmodels:\n  - model: {{root}}/chat\n"
            "  - model: {{root}}/{model}\ntokenizer_source: union\n")
    a = _merge_recipe(tmp_path, voc, text.format(method=method, model="multilingual"), tmp_path / "a",
                      "--chunk-rows", "5")
    b = _merge_recipe(tmp_path, voc, text.format(method=method, model="plain"), tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_linear_without_a_base_averages_tokens_some_models_lack(voc, tmp_path):
    """No base_model: a token two of three models have takes their mean in the third (no base row wins)."""
    text = ("merge_method: linear\nmodels:\n  - model: {root}/base\n  - model: {root}/chat\n"
            "  - model: {root}/multilingual\ntokenizer_source: union\ndtype: float32\n")
    out = _merge_recipe(tmp_path, voc, text, tmp_path / "out", "--chunk-rows", "4")
    got = load_file(out / "model.safetensors")
    for name in VOCAB_TENSORS:
        rows = reference_rows(voc, ["base", "chat", "multilingual"], _vocab(out), 304, name, named_base=False)
        torch.testing.assert_close(got[name], sum(rows) / 3, atol=2e-6, rtol=1e-5)


def test_padding_rows_are_each_inputs_mean_of_its_token_rows(voc, tmp_path):
    text = TA + "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n"
    out = _merge_recipe(tmp_path, voc, text, tmp_path / "out", "--chunk-rows", "9")
    got = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    for name in VOCAB_TENSORS:
        base, chat, multi = reference_rows(voc, ["base", "chat", "multilingual"], _vocab(out), 320, name)
        torch.testing.assert_close(got[name], base + 0.7 * (chat - base) + 0.5 * (multi - base), atol=2e-6,
                                   rtol=1e-5)
        assert not torch.equal(got[name][304], torch.zeros(48))
    plan = yaml.safe_load((out / "streammerge_recipe.yaml").read_text())
    assert plan["tokenizer"] == {"source": "union", "pad_to_multiple_of": 64}


def test_token_settings_zero_model_token_and_force(voc, tmp_path):
    text = TA + """tokenizer:
  source: union
  tokens:
    "<|im_start|>": {{source: {root}/chat, force: true}}
    "<vi>": {{source: {{kind: zero}}}}
    t5: {{source: {{kind: model_token, model: {root}/multilingual, token: t7}}, force: true}}
    "<new>": {{source: {{kind: model_token, model: {root}/chat, token_id: 3}}}}
"""
    out = _merge_recipe(tmp_path, voc, text, tmp_path / "out", "--chunk-rows", "6")
    vocab = _vocab(out)
    assert vocab["<new>"] == 304
    tokens = {"<|im_start|>": {"kind": "model", "input": 1, "force": True}, "<vi>": {"kind": "zero"},
              "t5": {"kind": "model_token", "input": 2, "token": "t7", "force": True},
              "<new>": {"kind": "model_token", "input": 1, "token_id": 3}}
    got = load_file(out / "model.safetensors")
    for name in VOCAB_TENSORS:
        base, chat, multi = reference_rows(voc, ["base", "chat", "multilingual"], vocab, 305, name, tokens=tokens)
        torch.testing.assert_close(got[name], base + 0.7 * (chat - base) + 0.5 * (multi - base), atol=2e-6,
                                   rtol=1e-5)
    # the base and chat lack <vi> and take zeros: only multilingual's change (its own row) is left
    multi = load_file(voc / "multilingual" / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(got["model.embed_tokens.weight"][vocab["<vi>"]], 0.5 * multi[302])
    again = _merge_recipe(tmp_path, voc, (out / "streammerge_recipe.yaml").read_text().replace("{", "{{")
                          .replace("}", "}}"), tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_a_padded_base_keeps_its_rows_and_their_values(voc, tmp_path):
    """A base with 320 rows beside 301 tokens (as Qwen pads): the output keeps 320 rows; rows no token uses stay
    each input's own stored rows (merged), never truncated to the tokenizer."""
    import shutil
    root = tmp_path / "padded"
    for name in ("base", "chat"):
        shutil.copytree(voc / name, root / name)
    set_vocab_rows(root / "base", [*range(V), *[None] * 19], seed=4)
    set_vocab_rows(root / "chat", [*range(303), *[None] * 17], seed=5)
    text = ("merge_method: task_arithmetic\nbase_model: {root}/base\nmodels:\n  - model: {root}/chat\n"
            "tokenizer_source: union\ndtype: float32\n")
    out = _merge_recipe(tmp_path, root, text, tmp_path / "out", "--chunk-rows", "8")
    got = load_file(out / "model.safetensors")
    base, chat = (load_file(root / n / "model.safetensors") for n in ("base", "chat"))
    for name in VOCAB_TENSORS:
        assert got[name].shape == (320, 48)
        torch.testing.assert_close(got[name][303:], chat[name][303:])  # base + (chat - base), stored padding rows
        torch.testing.assert_close(got[name][301:303], chat[name][301:303])  # chat's tokens: base takes its rows
        torch.testing.assert_close(got[name][:V], chat[name][:V])
    # base alone (tokenizer_source: base): nothing to map, the rows merge as stored
    plan = streammerge.plan(root / "base", [root / "base"], None, method="task_arithmetic", tokenizer_source="base")
    assert plan.vocabulary is None and plan.tensor("model.embed_tokens.weight").shape == (320, 48)


def test_an_interrupted_union_merge_resumes_to_the_same_bytes(voc, tmp_path):
    args = dict(method="widen", tokenizer_source="union", chunk_rows=5, threads=1)
    whole = streammerge.merge(voc / "base", [voc / "chat", voc / "multilingual"], tmp_path / "whole", **args)
    out = tmp_path / "out"
    interrupt_merge_after_chunks(9, lambda: streammerge.merge(voc / "base", [voc / "chat", voc / "multilingual"],
                                                               out, **args))
    streammerge.merge(voc / "base", [voc / "chat", voc / "multilingual"], out, **{**args, "threads": 2})
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_the_plan_says_how_each_inputs_rows_are_made(voc):
    plan = streammerge.plan(voc / "base", [voc / "chat", voc / "multilingual"], None, method="task_arithmetic",
                            tokenizer_source="union")
    d = plan.to_dict()
    assert d["vocabulary"]["added_tokens"] == list(UNION) and d["vocabulary"]["rows"] == 304
    assert d["vocabulary"]["inputs"][0] == {"own": 301, "other": 2, "mean": 1, "zero": 0, "padding_mean": 0}
    embed = next(t for t in d["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert embed["inputs"][2]["kind"] == "vocabulary" and embed["inputs"][2]["own_rows"] == 303
    assert any("3 added to base's tokenizer" in n for n in d["notes"])


@pytest.mark.parametrize("models,extra,expected", [
    (["chat"], ["--method", "ties"], ["shape [303, 48] in model 1", "--tokenizer-source union"]),
    (["chat"], ["--tokenizer-source", "base", "--method", "ties"], None),
])
def test_different_vocabularies_need_a_tokenizer_source(voc, tmp_path, models, extra, expected):
    args = ["merge", "--base", str(voc / "base"), *(a for m in models for a in ("--model", str(voc / m))),
            "--out", str(tmp_path / "out"), "-q", *extra]
    r = CliRunner().invoke(main, args)
    if expected is None:  # mapped onto the base's vocabulary: chat's two added tokens are left out
        assert r.exit_code == 0, r.output
        assert load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"].shape == (V, 48)
        return
    assert r.exit_code != 0 and not (tmp_path / "out").exists()
    for text in expected:
        assert text in r.output, r.output


@pytest.mark.parametrize("tokens,expected", [
    ('{{"<|im_start|>": {{source: {root}/multilingual}}}}', "has no token '<|im_start|>'"),
    ('{{"<vi>": {{force: true}}}}', "gives no source, and force needs one"),
    ('{{"<x>": {{}}}}', "gives no source, and some inputs lack the token"),
    ('{{t3: {{source: {{kind: model_token, model: {root}/chat, token_id: 999}}, force: true}}}}',
     "has 303 embedding rows, so no row 999"),
])
def test_token_settings_that_cannot_be_met_are_refused(voc, tmp_path, tokens, expected):
    recipe = tmp_path / "r.yml"
    recipe.write_text((TA + "tokenizer: {{source: union, tokens: " + tokens + "}}\n").format(root=voc))
    r = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and expected in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_transformers_loads_the_union_output_with_its_tokenizer(voc, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = streammerge.merge(voc / "base", [voc / "chat", voc / "multilingual"], tmp_path / "out",
                            method="task_arithmetic", tokenizer_source="union")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (304, 48) and len(tok) == 304
    ids = tok("<vi> t5 <|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [303, 5, 302]
    stored = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight.detach()[303], stored[303].float())
    card = (out / "README.md").read_text()
    assert "vocabulary" in card or "union" in card


def test_analyze_compares_inputs_that_differ_in_vocabulary(voc):
    """analyze --tokenizer-source maps the rows as merge does: the shuffled model's figures are the plain one's."""
    def figures(model: str) -> dict:
        r = CliRunner().invoke(main, ["analyze", "--base", str(voc / "base"), "--model", str(voc / "chat"),
                                      "--model", str(voc / model), "--tokenizer-source", "union", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    shuffled, plain = figures("multilingual"), figures("plain")
    embed = [next(t for t in d["tensors"] if t["name"] == "model.embed_tokens.weight") for d in (shuffled, plain)]
    assert embed[0]["shape"] == [304, 48]
    assert embed[0]["models"] == embed[1]["models"] and embed[0]["pairs"] == embed[1]["pairs"]


def test_inspect_says_which_option_maps_other_vocabularies_and_the_advice_works(voc, tmp_path):
    models = [voc / "chat", voc / "multilingual"]
    r = CliRunner().invoke(main, ["inspect", str(voc / "base"), *map(str, models)])
    assert r.exit_code == 0 and "can be merged with the options below" in r.output, r.output
    assert "vocabulary: 303 embedding rows, the base's 301" in r.output and "--tokenizer-source union" in r.output
    r = CliRunner().invoke(main, ["merge", "--base", str(voc / "base"), *(a for m in models for a in ("--model", str(m))),
                                  "--method", "ties", "--tokenizer-source", "union", "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output


def test_a_tokenizer_with_other_ids_is_pointed_out_when_rows_merge_as_stored(voc, tmp_path):
    """Same row count, tokens at other ids: merged row i with row i (as before, and as mergekit without
    tokenizer_source), but inspect and plan say so, and name the option that maps them."""
    import shutil
    shuffled = tmp_path / "shuffled"
    shutil.copytree(voc / "base", shuffled)
    write_tokenizer(shuffled, {f"t{(i + 1) % V}": i for i in range(V)})
    r = CliRunner().invoke(main, ["inspect", str(voc / "base"), str(shuffled)])
    assert "its tokenizer differs from the base's (301 tokens at other ids)" in r.output, r.output
    plan = streammerge.plan(voc / "base", [shuffled], None, method="ties")
    assert any("tokenizer differs from the base's" in n and "--tokenizer-source union" in n for n in plan.notes)
    mapped = streammerge.plan(voc / "base", [shuffled], None, method="ties", tokenizer_source="base")
    assert mapped.vocabulary is not None and mapped.vocabulary.counts(1)["own"] == V


def test_linear_with_a_named_base_gives_a_token_one_model_lacks_the_bases_row(voc, tmp_path):
    """mergekit passes base_model to every method's vocabulary step: linear with a base_model too."""
    import shutil
    renamed = voc.parent / "renamed-vocab" / "renamed"
    if not renamed.exists():
        shutil.copytree(voc / "base", renamed)
        write_tokenizer(renamed, {**{f"t{i}": i for i in range(V - 1)}, "<r>": V - 1})  # t300 is <r> here
    text = (f"merge_method: linear\nbase_model: {voc}/base\nmodels:\n  - model: {voc}/base\n  - model: {voc}/chat\n"
            f"  - model: {renamed}\ntokenizer_source: union\ndtype: float32\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    r = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    vocab = _vocab(tmp_path / "out")
    for name in VOCAB_TENSORS:
        rows = reference_rows(renamed.parent.parent, [f"{voc.name}/base", f"{voc.name}/chat", "renamed-vocab/renamed"],
                              vocab, len(vocab), name)
        torch.testing.assert_close(got[name], sum(rows) / 3, atol=2e-6, rtol=1e-5)
    base = load_file(voc / "base" / "model.safetensors")["model.embed_tokens.weight"]
    chat = load_file(voc / "chat" / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(got["model.embed_tokens.weight"][V - 1], (2 * base[V - 1] + chat[V - 1]) / 3)
    again = yaml.safe_load((tmp_path / "out" / "streammerge_recipe.yaml").read_text())
    assert again["base_model"] == str(voc / "base")


def test_a_frankenmerge_whose_embedding_and_head_models_differ_in_vocabulary_is_refused(voc, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {voc}/base, layer_range: [0, 2]}}]\n"
                      f"  - sources: [{{model: {voc}/chat, layer_range: [2, 3]}}]\n")
    r = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and "they must share one vocabulary" in r.output and "303 rows" in r.output, r.output


def test_tokens_only_another_tokenizer_has_get_zero_rows_and_a_note(voc, tmp_path):
    """tokenizer_source: a folder that is no input (mergekit allows any model): its tokens no input has are zeros."""
    tok = tmp_path / "tok"
    tok.mkdir()
    write_tokenizer(tok, {f"t{i}": i for i in range(V)}, {"<only-here>": V})
    plan = streammerge.plan(voc / "base", [voc / "plain"], None, method="task_arithmetic", tokenizer_source=tok)
    assert any("1 token no input has (<only-here>) get zero rows" in n for n in plan.notes), plan.notes
    out = streammerge.merge(voc / "base", [voc / "plain"], tmp_path / "out", method="task_arithmetic",
                            tokenizer_source=tok)
    assert torch.equal(load_file(out / "model.safetensors")["lm_head.weight"][V], torch.zeros(48))


def test_a_sentencepiece_only_tokenizer_is_refused_with_the_conversion(voc, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(voc / "chat", old)
    (old / "tokenizer.json").unlink()
    (old / "tokenizer.model").write_bytes(b"\x0a\x00")
    r = CliRunner().invoke(main, ["plan", "--base", str(voc / "base"), "--model", str(old), "--method", "ties",
                                  "--tokenizer-source", "union"])
    assert r.exit_code != 0 and "tokenizer.model (a sentencepiece tokenizer) but no tokenizer.json" in r.output
    assert "save_pretrained" in r.output
