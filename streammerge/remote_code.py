"""The Python files a remote-code model needs (``trust_remote_code=True``): the modules its ``auto_map`` names, in
``config.json`` (model, configuration) and ``tokenizer_config.json`` (tokenizer), and the modules those import
relatively. They are copied into the output as files, never imported or run: the modules are found by reading
``auto_map`` and scanning the files' text for ``from .x import`` lines, as transformers' ``custom_object_save``
copies them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)\s+import\s", re.MULTILINE)


def auto_map_modules(auto_map: Any) -> list[str]:
    """Module names in an ``auto_map`` (``"modeling_x.Class"``, or a list for tokenizers; entries that point to
    another repository, ``"org/repo--module.Class"``, and malformed ones are skipped)."""
    refs: list[Any] = []
    if isinstance(auto_map, dict):
        for value in auto_map.values():
            refs.extend(value if isinstance(value, list) else [value])
    out: list[str] = []
    for ref in refs:
        if not isinstance(ref, str) or "--" in ref or "." not in ref:
            continue
        module = ref.rsplit(".", 1)[0]
        if _MODULE.fullmatch(module) and module not in out:
            out.append(module)
    return out


def code_files(folder: Path, config_names: tuple[str, ...] = ("config.json", "tokenizer_config.json")) -> list[Path]:
    """The ``.py`` files in ``folder`` that the ``auto_map`` of its config files names, with the modules they import
    relatively (transitively); files that are not there are left out (the input would not load either)."""
    pending: list[str] = []
    for name in config_names:
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            pending += auto_map_modules(config.get("auto_map"))
    found: dict[str, Path] = {}
    while pending:
        module = pending.pop(0)
        path = folder / f"{module}.py"
        if module in found or not path.is_file():
            continue
        found[module] = path
        pending += _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8", errors="replace"))
    return list(found.values())
