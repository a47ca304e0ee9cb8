"""PEFT LoRA adapter folders, read as data: ``adapter_config.json`` and the header of ``adapter_model.safetensors``.

A folder that ``PeftModel.save_pretrained`` wrote holds ``adapter_config.json`` (a ``LoraConfig``, peft
``tuners/lora/config.py``) and ``adapter_model.safetensors``, whose tensors are named after the modules of the
wrapped model (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; transformers' own PEFT
integration saves them without the ``base_model.model.`` prefix). This module reads the config into typed
:class:`LoraSettings`, refusing by name every setting whose meaning streammerge does not apply, and the weights'
header through the hardened parser (:func:`~streammerge.formats.safetensors_header.read_header`). A pickled
``adapter_model.bin`` is refused, never unpickled. Nothing here reads tensor data, and nothing here knows the model
the adapter is applied to: :mod:`streammerge.lora` matches the two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError
from .checkpoint import Located, _read_json
from .safetensors_header import ShardHeader, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: pickled adapter weights (refused, never loaded)
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
#: settings of a ``LoraConfig`` that change what the adapter means in ways streammerge does not apply, refused when
#: set (not None, not false, not empty), with what they are
UNSUPPORTED = {
    "target_parameters": "LoRA on parameters (target_parameters, e.g. MoE experts stored as one 3-D tensor)",
    "layer_replication": "layer replication (the adapted model has more layers than the base)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens: the adapter acts only after those tokens)",
    "arrow_config": "Arrow routing between adapters (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "lora_ga_config": "LoRA-GA (lora_ga_config: its initialisation changes the base weights)",
    "ensure_weight_tying": "adapters shared between a tied embedding and head (ensure_weight_tying)",
    "megatron_config": "Megatron tensor-parallel LoRA layers (megatron_config)",
}
#: ``init_lora_weights`` values (prefixes) whose initialisation rewrites the base weights (the adapter is relative to
#: a residual model PEFT made at init, not to the base) or turns on a variant with its own merge
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
#: the prefix PEFT's ``save_pretrained`` puts before the wrapped model's module names
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSettings:
    """The settings of a LoRA adapter that decide its weights' meaning (PEFT ``LoraConfig``, same names).

    ``rank_pattern`` and ``alpha_pattern`` map a module-name pattern to that module's ``r`` / ``lora_alpha`` (in the
    file's order: the first that matches wins, :meth:`rank_of`). ``trainable_token_indices``: token rows trained
    and saved whole (a list for the input embedding, or a mapping from module name to rows). ``bias``: PEFT's
    ``bias`` ("none", "all", "lora_only": the trained biases are saved in the adapter and replace the model's)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    modules_to_save: tuple[str, ...] = ()
    trainable_token_indices: tuple[tuple[str | None, tuple[int, ...]], ...] = ()  # (module or None: the input
    # embedding, its rows)
    base_model_name_or_path: str | None = None

    def rank_of(self, module: str) -> int:
        """``r`` of ``module`` (its name in the wrapped model, e.g. ``model.layers.0.self_attn.q_proj``)."""
        key = pattern_key([k for k, _ in self.rank_pattern], module)
        return dict(self.rank_pattern).get(key, self.r)

    def alpha_of(self, module: str) -> float:
        """``lora_alpha`` of ``module``."""
        key = pattern_key([k for k, _ in self.alpha_pattern], module)
        return dict(self.alpha_pattern).get(key, self.lora_alpha)

    def scale_of(self, module: str) -> float:
        """The factor on ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora`` (PEFT
        ``LoraLayer.update_layer``), with the module's own ``r`` and ``lora_alpha``."""
        r, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_key(patterns: list[str], module: str) -> str:
    """The first pattern that matches ``module`` the way PEFT matches ``rank_pattern``/``alpha_pattern`` keys (peft
    ``utils/other.py`` ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", module)``), else ``module`` itself."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass(frozen=True)
class PeftAdapter:
    """One adapter folder: its settings, the raw config, and the tensors of ``adapter_model.safetensors`` by their
    module names (the ``base_model.model.`` prefix removed)."""

    folder: Path
    weights: Path
    settings: LoraSettings
    header: ShardHeader
    tensors: dict[str, Located]

    @property
    def total_bytes(self) -> int:
        return sum(loc.info.nbytes for loc in self.tensors.values())


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``adapter_config.json`` (a PEFT adapter, not a model)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def load_adapter(folder: str | Path) -> PeftAdapter:
    """Read ``folder``'s adapter config and weights header (no tensor data); raises :class:`AdapterError` for a
    folder that is not a PEFT LoRA adapter, pickled weights, a setting streammerge does not apply, or bad values."""
    root = Path(folder)
    if not root.is_dir():
        raise AdapterError(f"LoRA adapter folder {root} does not exist")
    config_path = root / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{root} holds no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (root / name).is_file()]
        if pickled:
            raise AdapterError(f"{root} has only pickled adapter weights ({pickled[0]}); streammerge never unpickles "
                               "files: load the adapter with PEFT and save it again with "
                               "save_pretrained(DIR, safe_serialization=True) (only for adapters you trust: loading a "
                               "pickle can run code)")
        raise AdapterError(f"{root} holds {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    settings = parse_settings(config, config_path)
    header = read_header(weights)
    tensors: dict[str, Located] = {}
    for name, info in header.tensors.items():
        module_name = name.removeprefix(PEFT_PREFIX)
        if module_name in tensors:
            raise AdapterError(f"{weights}: tensors {name!r} and {module_name!r} name the same module")
        tensors[module_name] = Located(header.path, info)
    if not tensors:
        raise AdapterError(f"{weights} holds no tensors")
    return PeftAdapter(root, weights, settings, header, tensors)


def parse_settings(config: dict[str, Any], where: Path | str) -> LoraSettings:
    """The :class:`LoraSettings` of an ``adapter_config.json`` object; raises :class:`AdapterError` naming the
    setting for anything that is not a plain LoRA streammerge applies exactly."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; streammerge applies LoRA adapters (peft_type "
                           "LORA) only")
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}, ""):
            raise AdapterError(f"{where}: {what} is not supported; merge this adapter with PEFT "
                               "(merge_and_unload) instead")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights {init!r} initialises the adapter from the base's own weights and trains it "
            "against a changed base (or makes it a variant with its own merge), so adding it to the base is not its "
            "meaning; convert it with PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    r = config.get("r")
    if not _positive_int(r):
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not _number(alpha):
        raise AdapterError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    flags = {}
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise AdapterError(f"{where}: {key} must be true or false, got {value!r}")
        flags[key] = value
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise AdapterError(f"{where}: bias must be none, all or lora_only, got {bias!r}")
    return LoraSettings(
        r=r, lora_alpha=alpha, **flags, bias=bias,
        rank_pattern=_pattern(config.get("rank_pattern"), where, "rank_pattern", _positive_int, "positive integers"),
        alpha_pattern=_pattern(config.get("alpha_pattern"), where, "alpha_pattern", _number, "numbers"),
        modules_to_save=_names(config.get("modules_to_save"), where),
        trainable_token_indices=_token_indices(config.get("trainable_token_indices"), where),
        base_model_name_or_path=config.get("base_model_name_or_path")
        if isinstance(config.get("base_model_name_or_path"), str) else None,
    )


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pattern(value: Any, where: Path | str, key: str, ok: Any, what: str) -> tuple[tuple[str, Any], ...]:
    if value in (None, {}):
        return ()
    if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v) for k, v in value.items()):
        raise AdapterError(f"{where}: {key} must map module-name patterns to {what}, got {value!r}")
    for k in value:
        try:
            re.compile(k)
        except re.error as exc:
            raise AdapterError(f"{where}: {key} key {k!r} is not a regular expression ({exc})") from None
    return tuple(value.items())


def _names(value: Any, where: Path | str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{where}: modules_to_save must be a list of module names, got {value!r}")
    return tuple(value)


def _token_indices(value: Any, where: Path | str) -> tuple[tuple[str | None, tuple[int, ...]], ...]:
    if value is None:
        return ()
    entries = [(None, value)] if isinstance(value, list) else list(value.items()) if isinstance(value, dict) else None
    if entries is None:
        raise AdapterError(f"{where}: trainable_token_indices must be a list of token ids or a mapping from module "
                           f"names to lists, got {value!r}")
    out = []
    for module, ids in entries:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            raise AdapterError(f"{where}: trainable_token_indices{'' if module is None else f'[{module!r}]'} must "
                               f"be a list of token ids, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise AdapterError(f"{where}: trainable_token_indices{'' if module is None else f'[{module!r}]'} repeats "
                               "a token id")
        out.append((module, tuple(ids)))
    return tuple(out)
