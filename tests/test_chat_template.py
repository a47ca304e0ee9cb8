"""``chat_template: <built-in>`` means what it means in mergekit 0.1.5: each of streammerge's own built-in templates
renders, for any conversation, the very string mergekit's template of that name renders.

Both are rendered as transformers renders chat templates (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception`` provided) on conversations with and without a system message, multi-turn,
with and without a generation prompt, with contents that carry leading and trailing spaces and newlines, and on
layouts a template refuses (then both must refuse). mergekit's templates are read from its own environment, found as
tests/test_mergekit_parity.py finds it (``STREAMMERGE_MERGEKIT``, ``.ci-mergekit-venv``, ``bench/.mergekit-venv``),
else from ``/tmp/mkvenv``; without one those comparisons are skipped, saying so, and the fixed renderings below
(each checked against mergekit's when they were written) still pin the behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import MERGEKIT_MISSING, find_mergekit

from streammerge.chat_template import BUILTIN, TEMPLATE_FILE
from streammerge.cli import main
from streammerge.examples import write_family

jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

MERGEKIT_VERSION = "0.1.5"


# ------------------------------------------------------------------------------- rendering as transformers does

def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' chat-template environment (transformers/utils/chat_template_utils.py), less what no template here
    uses (its ``{% generation %}`` tracker, ``tojson``, ``strftime_now``, ``dict``, ``namespace``)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env


ENV = _environment()


def render(template: str, messages: list[dict], add_generation_prompt: bool, **tokens: str) -> str:
    return ENV.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


def outcome(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict) -> tuple[str, str]:
    """("text", the rendering) or ("raises", the exception's class): a refused conversation is compared by that."""
    try:
        return "text", render(template, messages, add_generation_prompt, **tokens)
    except Exception as e:  # noqa: BLE001 - which one is what is compared
        return "raises", type(e).__name__


def _m(role: str, content) -> dict:  # type: ignore[no-untyped-def]
    return {"role": role, "content": content}


SYSTEM, USER, ASSISTANT = _m("system", " Be brief.\n"), _m("user", "\n  What is 2+2? "), _m("assistant", " 4. \n\n")

#: conversations every built-in is rendered on; some are ones a template refuses
CONVERSATIONS: dict[str, list[dict]] = {
    "system+user": [SYSTEM, USER],
    "user": [USER],
    "user-plain": [_m("user", "hi")],
    "user/assistant/user": [USER, ASSISTANT, _m("user", "And 3+3?\n")],
    "system+user/assistant/user": [SYSTEM, USER, ASSISTANT, _m("user", " And 3+3?")],
    "user/assistant": [USER, ASSISTANT],
    "system-only": [SYSTEM],
    "empty": [],
    "empty-contents": [_m("system", ""), _m("user", ""), _m("assistant", "")],
    "whitespace-contents": [_m("system", " \n "), _m("user", "\n\n"), _m("assistant", "  ")],
    "two-systems": [SYSTEM, USER, _m("system", "\tBe kind. "), _m("user", "ok")],
    "system-last": [USER, ASSISTANT, _m("system", "late")],
    "assistant-first": [ASSISTANT, USER],
    "two-users": [USER, _m("user", "again")],
    "user_context": [SYSTEM, USER, _m("user_context", " some input \n"), ASSISTANT],
    "other-role": [USER, _m("tool", " 42 ")],
    "system-without-content": [{"role": "system"}, USER],
    "none-content": [_m("user", None)],
}

#: what the tokenizer passes (transformers passes its special tokens; one without bos passes none)
TOKENS: dict[str, dict] = {
    "bos+eos": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3-tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "eos-only": {"eos_token": "<|endoftext|>"},
    "none": {},
}


# ------------------------------------------------------------------------------------ mergekit 0.1.5's templates

def _mergekit_templates() -> tuple[Path | None, str]:
    """The folder of mergekit 0.1.5's built-in chat templates, or None and why there is none."""
    roots = []
    executable = find_mergekit()
    if executable is not None:
        roots.append(Path(executable).parent.parent)  # the environment of its bin/mergekit-yaml
    roots.append(Path("/tmp/mkvenv"))
    reason = MERGEKIT_MISSING + "; nor is it in /tmp/mkvenv"
    for root in roots:
        for site in sorted(root.glob("lib/python*/site-packages")) + sorted(root.glob("Lib/site-packages")):
            folder = site / "mergekit" / "_data" / "chat_templates"
            if not folder.is_dir():
                continue
            versions = [p.name[len("mergekit-"):-len(".dist-info")] for p in site.glob("mergekit-*.dist-info")]
            if versions and MERGEKIT_VERSION not in versions:
                reason = f"the mergekit in {site} is {', '.join(versions)}, not {MERGEKIT_VERSION}"
                continue
            return folder, ""
    return None, reason


MERGEKIT_TEMPLATES, MERGEKIT_REASON = _mergekit_templates()
needs_mergekit = pytest.mark.skipif(MERGEKIT_TEMPLATES is None, reason=MERGEKIT_REASON)


def _theirs(name: str) -> str:
    assert MERGEKIT_TEMPLATES is not None
    return (MERGEKIT_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")  # as mergekit reads it


@needs_mergekit
def test_the_built_in_names_are_mergekits():
    assert MERGEKIT_TEMPLATES is not None
    assert {p.stem for p in MERGEKIT_TEMPLATES.glob("*.jinja")} == set(BUILTIN)


@needs_mergekit
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_built_in_renders_what_mergekits_renders(name):
    ours, theirs = BUILTIN[name], _theirs(name)
    differences, rendered = [], 0
    for conversation, messages in CONVERSATIONS.items():
        for tokens_name, tokens in TOKENS.items():
            for prompt in (False, True):
                got, want = outcome(ours, messages, prompt, tokens), outcome(theirs, messages, prompt, tokens)
                rendered += got[0] == "text"
                if got != want:
                    differences.append(f"{conversation}, {tokens_name}, add_generation_prompt={prompt}:\n"
                                       f"  ours:       {got!r}\n  mergekit's: {want!r}")
    assert not differences, f"{name}: {len(differences)} renderings differ\n" + "\n".join(differences[:8])
    assert rendered >= 10  # most conversations render: the comparison is not only of refusals


_ROLES = ["system", "user", "assistant", "user_context", "tool"]


@needs_mergekit
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_built_in_renders_what_mergekits_renders_on_drawn_conversations(name):
    """Conversations drawn at random (roles in any order, contents of spaces, tabs, newlines, markup-like text)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    ours, theirs = ENV.from_string(BUILTIN[name]), ENV.from_string(_theirs(name))
    piece = st.sampled_from([" ", "\n", "\t", "a", "Z", "7", "é", "{{", "[INST]", "<s>"])
    content = st.lists(piece, max_size=8).map("".join)
    message = st.builds(_m, st.sampled_from(_ROLES), content)
    # mistral refuses most random role orders: draw alternating ones too, so its renderings are compared as well
    alternating = st.builds(lambda system, turns: system + [_m("user" if i % 2 == 0 else "assistant", c)
                                                            for i, c in enumerate(turns)],
                            st.lists(st.builds(_m, st.just("system"), content), max_size=1),
                            st.lists(content, max_size=5))

    def both(template, messages, prompt):  # type: ignore[no-untyped-def]
        try:
            return "text", template.render(messages=messages, add_generation_prompt=prompt, bos_token="<s>",
                                           eos_token="</s>")
        except Exception as e:  # noqa: BLE001
            return "raises", type(e).__name__

    @hypothesis.settings(max_examples=300, derandomize=True, deadline=None, database=None)
    @hypothesis.given(st.one_of(st.lists(message, max_size=6), alternating), st.booleans())
    def check(messages, prompt):  # type: ignore[no-untyped-def]
        assert both(ours, messages, prompt) == both(theirs, messages, prompt), messages

    check()


# ------------------------------------------------------------------------ fixed renderings, without mergekit

#: one conversation (system, user, assistant, user; contents with outer whitespace) with a generation prompt and the
#: tokens bos ``<s>``, eos ``</s>``: what each built-in renders, mergekit 0.1.5's rendering (checked when written)
FIXED_CONVERSATION = [SYSTEM, USER, ASSISTANT, _m("user", " And 3+3?")]
FIXED = {
    "chatml": (
        "<|im_start|>system\n Be brief.\n<|im_end|>\n"
        "<|im_start|>user\n\n  What is 2+2? <|im_end|>\n"
        "<|im_start|>assistant\n 4. \n\n<|im_end|>\n"
        "<|im_start|>user\n And 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "alpaca": (
        "Be brief.\n\n"
        "### Instruction:\nWhat is 2+2?\n\n"
        "### Response:\n4.\n\n"
        "### Instruction:\nAnd 3+3?"
        "### Response:\n"
    ),
    "mistral": "<s> [INST]  Be brief.\n\n\n\n  What is 2+2?  [/INST]  4. \n\n</s> [INST]  And 3+3? [/INST]",
    "exaone": (
        "    [|system|] Be brief.\n\n        [|endofturn|]\n\n"
        "    [|user|]\n  What is 2+2? \n        \n\n"
        "    [|assistant|] 4. \n\n\n        [|endofturn|]\n\n"
        "    [|user|] And 3+3?\n        \n\n"
        "    [|assistant|]\n"
    ),
}


def test_every_built_in_has_a_fixed_rendering():
    assert set(FIXED) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_built_in_renders_its_fixed_string(name):
    assert render(BUILTIN[name], FIXED_CONVERSATION, True, bos_token="<s>", eos_token="</s>") == FIXED[name]


@needs_mergekit
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_the_fixed_strings_are_mergekits(name):
    assert render(_theirs(name), FIXED_CONVERSATION, True, bos_token="<s>", eos_token="</s>") == FIXED[name]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_built_in_is_one_line_that_renders_alike_under_any_whitespace_settings(name):
    """No newline outside the templates' strings: trim_blocks and lstrip_blocks change nothing (other tools render
    chat templates without them)."""
    plain = ImmutableSandboxedEnvironment()
    plain.globals["raise_exception"] = _raise_exception
    assert "\n" not in BUILTIN[name]
    for messages in (FIXED_CONVERSATION, [USER], CONVERSATIONS["user_context"]):
        for prompt in (False, True):
            want = outcome(BUILTIN[name], messages, prompt, TOKENS["bos+eos"])
            try:
                got = "text", plain.from_string(BUILTIN[name]).render(messages=messages, add_generation_prompt=prompt,
                                                                      **TOKENS["bos+eos"])
            except jinja2.exceptions.TemplateError as e:
                got = "raises", type(e).__name__
            assert got == want


def test_mistral_and_alpaca_without_a_generation_prompt():
    """mistral has none (a prompt ends with [/INST]); alpaca's follows the last user message directly, and none
    follows an assistant's."""
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    assert render(BUILTIN["mistral"], [USER], False, **tokens) == render(BUILTIN["mistral"], [USER], True, **tokens)
    assert render(BUILTIN["alpaca"], [USER], False) == "\n\n### Instruction:\nWhat is 2+2?"
    assert render(BUILTIN["alpaca"], [USER, ASSISTANT], True) == "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4."


def test_mistral_refuses_what_mergekits_refuses():
    for messages in ([ASSISTANT, USER], [USER, USER], [USER, _m("tool", "x")], [USER, ASSISTANT, SYSTEM]):
        with pytest.raises(jinja2.exceptions.TemplateError):
            render(BUILTIN["mistral"], messages, True, bos_token="<s>", eos_token="</s>")


def test_transformers_renders_the_built_ins_as_this_environment_does():
    """The environment above is transformers' own, as far as these templates go."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    compile_template = getattr(utils, "_compile_jinja_template", None)
    if compile_template is None:
        pytest.skip("this transformers has no _compile_jinja_template")
    for name, template in BUILTIN.items():
        compiled = compile_template(template)
        for messages in (FIXED_CONVERSATION, [USER], CONVERSATIONS["user_context"]):
            for prompt in (False, True):
                try:
                    want = render(template, messages, prompt, bos_token="<s>", eos_token="</s>")
                except jinja2.exceptions.TemplateError:
                    continue
                got = compiled.render(messages=messages, add_generation_prompt=prompt, bos_token="<s>",
                                      eos_token="</s>")
                assert got == want, (name, messages, prompt)


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    paths = write_family(tmp_path_factory.mktemp("fam"), dtype="f32")
    for folder in paths.values():  # each carries a template, so the output's tokenizer_config.json gets one too
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'old' }}"}))
    return paths


@pytest.mark.parametrize("name", ["mistral", "exaone"])
def test_a_recipe_writes_the_built_in_it_names(family, tmp_path, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {family['base']}\nmodels:\n  - model: {family['base']}\n"
                      f"  - model: {family['chat']}\ndtype: float32\nchat_template: {name}\n")
    r = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / TEMPLATE_FILE).read_text(encoding="utf-8") == BUILTIN[name]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == BUILTIN[name]
