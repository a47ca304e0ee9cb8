"""The mergekit YAML config that performs the same merge as a ``streammerge merge`` command line.

    mergekit_yaml("ties", base, [chat, multilingual], {"density": "0.5"}, "bfloat16") -> YAML text

streammerge uses mergekit's parameter names (weight, density, gamma, lambda, normalize, rescale, t), so the
mapping is mostly a matter of where each goes: per-model parameters (comma-separated values, one per model, or
one value for all) under each model, shared ones at the top. Both tools compute in float32 (``dtype: float32``)
and cast to the output dtype (``out_dtype``). Defaults left out are the same in both tools; ``weight``, which
mergekit requires, defaults to 1.0 as in streammerge. ``seed`` is dropped: the two tools draw different random
masks whatever the seed (mergekit's is ``--random-seed``).
"""

from __future__ import annotations

import json
from pathlib import Path

# method -> (shared parameters, per-model parameters), as mergekit 0.1.5 declares them.
_DELTA = ("int8_mask", "normalize", "rescale", "lambda")
METHODS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("normalize",), ("weight",)),
    "task_arithmetic": (_DELTA, ("weight", "density")),
    "ties": (_DELTA, ("weight", "density")),
    "dare_linear": (_DELTA, ("weight", "density")),
    "dare_ties": (_DELTA, ("weight", "density")),
    "breadcrumbs": (_DELTA, ("weight", "density", "gamma")),
    "breadcrumbs_ties": (_DELTA, ("weight", "density", "gamma")),
    "della": (_DELTA, ("weight", "density", "epsilon")),
    "della_linear": (_DELTA, ("weight", "density", "epsilon")),
    "sce": (("int8_mask", "select_topk"), ()),
    "slerp": (("t",), ()),
    "model_stock": (("filter_wise",), ()),
    "nearswap": (("t",), ()),
    "nuslerp": (("nuslerp_flatten", "nuslerp_row_wise"), ("weight",)),
    "multislerp": (("normalize_weights", "eps"), ("weight",)),
    "karcher": (("max_iter", "tol"), ()),
    "arcee_fusion": ((), ()),
    "ram": (("epsilon",), ()),
    "ramplus_tl": (("r", "alpha", "epsilon"), ()),
}
#: methods for which streammerge's --base is not an input (base_policy "none"): no base_model in the config
NO_BASE = {"linear", "karcher"}
BOOLS = {"int8_mask", "normalize", "rescale", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise",
         "normalize_weights"}
INTS = {"max_iter"}
IGNORED = {"seed"}
# safetensors header dtype -> mergekit dtype name
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _scalar(name: str, text: str) -> str:
    """One parameter value as YAML (bools as true/false, numbers as numbers)."""
    text = text.strip()
    if name in BOOLS:
        low = text.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}={text!r} is not a boolean")
        return "true" if low in ("true", "1", "yes") else "false"
    if name in INTS:
        return str(int(text))
    return repr(float(text))


def _model(path: Path, params: dict[str, str]) -> list[str]:
    lines = [f"  - model: {json.dumps(str(path))}"]
    if params:
        lines.append("    parameters:")
        lines += [f"      {k}: {v}" for k, v in params.items()]
    return lines


def mergekit_yaml(method: str, base: Path, models: list[Path], params: dict[str, str], dtype: str,
                  compute_dtype: str = "float32") -> str:
    """The mergekit config for ``streammerge merge --base BASE --model ... --method METHOD --param ...``.

    ``dtype`` is the output dtype (mergekit's ``out_dtype``); raises ValueError for a method or parameter
    mergekit does not have.
    """
    if method not in METHODS:
        raise ValueError(f"mergekit has no {method!r} method")
    shared_names, per_model_names = METHODS[method]
    shared: dict[str, str] = {}
    per_model: list[dict[str, str]] = [{} for _ in models]
    for name, text in params.items():
        if name in IGNORED:
            continue
        if name in shared_names:
            shared[name] = _scalar(name, text)
        elif name in per_model_names:
            values = text.split(",")
            if len(values) not in (1, len(models)):
                raise ValueError(f"{name}={text!r}: give one value or one per model ({len(models)})")
            for i, d in enumerate(per_model):
                d[name] = _scalar(name, values[i if len(values) > 1 else 0])
        else:
            raise ValueError(f"mergekit's {method} has no parameter {name!r}")
    if "weight" in per_model_names:
        for d in per_model:
            d.setdefault("weight", "1.0")

    lines = [f"merge_method: {method}"]
    if method == "slerp":  # the base is the first model: t=0 gives the base
        lines.append(f"base_model: {json.dumps(str(base))}")
        entries = _model(base, {}) + [e for m, d in zip(models, per_model) for e in _model(m, d)]
    else:
        if method not in NO_BASE:  # linear and karcher combine the models only, as streammerge's CLI does
            lines.append(f"base_model: {json.dumps(str(base))}")
        entries = [e for m, d in zip(models, per_model) for e in _model(m, d)]
    lines += ["models:", *entries]
    if shared:
        lines.append("parameters:")
        lines += [f"  {k}: {v}" for k, v in shared.items()]
    lines += [f"dtype: {compute_dtype}", f"out_dtype: {dtype}"]
    return "\n".join(lines) + "\n"


def safetensors_dtype(folder: Path) -> str:
    """The most common floating dtype of a model folder's tensors, as a mergekit dtype name (headers only)."""
    counts: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__" and v["dtype"] in DTYPES:
                counts[v["dtype"]] = counts.get(v["dtype"], 0) + 1
    if not counts:
        raise ValueError(f"no floating-point safetensors tensors in {folder}")
    return DTYPES[max(counts, key=counts.__getitem__)]
