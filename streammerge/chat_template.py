"""The output's chat template, as a recipe's ``chat_template:`` asks (mergekit's key): decided when the merge is
planned, written with the side files.

- ``auto``: the template most of the inputs (base and models) carry, compared as text; on a tie, the one the
  earliest input carries (the base first). Inputs without one do not vote; none with one: the output keeps the
  tokenizer's files as they are.
- a built-in name, as mergekit 0.1.5 has them: ``chatml`` (``<|im_start|>role ... <|im_end|>``), ``llama3``
  (``<|start_header_id|>role<|end_header_id|> ... <|eot_id|>``), ``alpaca`` (``### Instruction:`` /
  ``### Response:``), ``mistral`` (``[INST] ... [/INST]``), ``exaone`` (``[|role|] ... [|endofturn|]``). The text is
  streammerge's own, but for any conversation it renders (with transformers' Jinja settings) the same string as
  mergekit 0.1.5's template of that name: whitespace, bos/eos, system message and generation prompt alike, quirks
  included (see :data:`BUILTIN`). tests/test_chat_template.py renders both on a set of conversations and compares
  them where mergekit is installed, and pins one rendering per built-in where it is not.
- anything else that contains Jinja markup (``{{`` or ``{%``): that template, as written.

A template is read from ``chat_template.jinja`` (what transformers saves since 4.43) or the ``chat_template`` of
``tokenizer_config.json``; the output gets ``chat_template.jinja`` and, where its ``tokenizer_config.json`` carries
one, the same text there, so both places agree.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import PlanError

#: the templates known by name: written for streammerge in each format's published conventions, laid out so that
#: transformers' Jinja settings (``trim_blocks``, ``lstrip_blocks``) change nothing, and rendering, for any
#: conversation, the very string mergekit 0.1.5's template of that name renders (tests/test_chat_template.py)
BUILTIN = {
    # ChatML: every turn ``<|im_start|>role\n...<|im_end|>\n``, contents as given; no bos.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: bos before the first turn, each turn a header, the trimmed content and ``<|eot_id|>``, then a newline
    # (mergekit's layout; Meta's own template has none there).
    "llama3": (
        "{% for message in messages %}"
        "{{ (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + (message['content'] | trim) + '<|eot_id|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Alpaca: the last system message, trimmed, and a blank line (the blank line also without one); then a
    # ``### Instruction:`` (user), ``### Input:`` (user_context) or ``### Response:`` (assistant) section per message,
    # its content trimmed, a blank line after every one but the conversation's last message; no eos. The generation
    # prompt follows the last message without a blank line (mergekit's layout).
    "alpaca": (
        "{% for message in messages if message['role'] == 'system' %}"
        "{% if loop.last %}{{ message['content'] | trim }}{% endif %}"
        "{% endfor %}"
        "{{ '\\n\\n' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + (message['content'] | trim) }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + (message['content'] | trim) }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + (message['content'] | trim) }}"
        "{% endif %}"
        "{% if message['role'] in ['user', 'user_context', 'assistant'] and not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Mistral: bos, then `` [INST] user [/INST]`` and `` assistant</s>`` strictly alternating, user first; a leading
    # system message goes into the first [INST], a blank line before the user's text. No generation prompt: a prompt
    # ends with [/INST]. Other layouts are refused (raise_exception, as transformers provides it).
    "mistral": (
        "{% set has_system = messages[0]['role'] == 'system' %}"
        "{{ bos_token }}"
        "{% for message in (messages[1:] if has_system else messages) %}"
        "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
        "{{ raise_exception('mistral: after an optional system message, turns go user, assistant, user, ...') }}"
        "{% elif message['role'] == 'user' %}"
        "{{ ' [INST] ' + (messages[0]['content'] + '\\n\\n' if loop.first and has_system"
        " and messages[0]['content'] is defined else '') + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + eos_token }}"
        "{% else %}"
        "{{ raise_exception('mistral: only user and assistant turns, after an optional system message') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # EXAONE: ``[|role|]content`` turns, a user's closed by a newline, any other's by ``[|endofturn|]`` and a newline;
    # an empty system turn first where the conversation has none. Laid out as mergekit 0.1.5's template renders
    # under transformers' settings: its indentation and blank lines come out, so each turn starts with 4 spaces
    # (the added system turn with 8), each closing is indented by 8 spaces, and a newline ends every piece.
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
        "{{ '    [|' + message['role'] + '|]' + message['content'] + '\\n' }}"
        "{{ '        \\n\\n' if message['role'] == 'user' else '        [|endofturn|]\\n\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
    ),
}
TEMPLATE_FILE = "chat_template.jinja"


def read_template(folder: Path) -> str | None:
    """The chat template ``folder`` carries (``chat_template.jinja``, else ``tokenizer_config.json``'s), or None."""
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError):
            return None
        if isinstance(value, str):
            return value
    return None


def resolve(setting: str | None, folders: list[Path]) -> str | None:
    """The template text for ``setting`` (see the module docstring), or None to keep the tokenizer's files as they
    are. Raises :class:`PlanError` for a name that is neither built in nor a template."""
    if setting is None:
        return None
    if setting == "auto":
        found = [t for t in (read_template(f) for f in folders) if t]
        if not found:
            return None
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best)  # the earliest input's among the most common
    if setting in BUILTIN:
        return BUILTIN[setting]
    if "{{" in setting or "{%" in setting:
        return setting
    raise PlanError(f"chat_template {setting!r} is neither auto, a built-in name ({', '.join(BUILTIN)}) nor a Jinja "
                    "template")


def write_template(work: Path, template: str) -> list[str]:
    """Write ``template`` as ``chat_template.jinja`` in the output folder ``work`` and into its
    ``tokenizer_config.json`` when that carries one; returns the names written."""
    from . import fsio  # noqa: PLC0415
    from .output import write_json  # noqa: PLC0415

    fsio.write_file(work / TEMPLATE_FILE, template.encode("utf-8"))
    written = [TEMPLATE_FILE]
    config = work / "tokenizer_config.json"
    if config.is_file():
        doc = json.loads(config.read_text(encoding="utf-8"))
        if "chat_template" in doc:
            doc["chat_template"] = template
            write_json(config, doc)
            written.append(config.name)
    return written
