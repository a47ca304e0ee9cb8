"""The output's chat template, as a recipe's ``chat_template:`` asks (mergekit's key): decided when the merge is
planned, written with the side files.

- ``auto``: the template most of the inputs (base and models) carry, compared as text; on a tie, the one the
  earliest input carries (the base first). Inputs without one do not vote; none with one: the output keeps the
  tokenizer's files as they are.
- a built-in name, as mergekit has them: ``chatml`` (``<|im_start|>role ... <|im_end|>``), ``llama3``
  (``<|start_header_id|>role<|end_header_id|> ... <|eot_id|>``), ``alpaca`` (``### Instruction:`` /
  ``### Response:``), ``mistral`` (``[INST] ... [/INST]``); written here for each format, so the text may differ
  from mergekit's files in whitespace.
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

#: the templates known by name (written for streammerge, in the formats' published conventions)
BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
        "+ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + "
        "'\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
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
