"""LoRA adapters as inputs: ``MODEL+ADAPTER`` is a virtual model, the model with the adapter merged in, streamed.

No merged copy of any model is written or held. An input with an adapter is its model's checkpoint with the parsed
adapter attached (:func:`load_input`); when the plan is made, :func:`adapted` decides once, from the headers and the
adapter's config, which source yields every tensor the adapter changes (:mod:`streammerge.sources.lora`): a LoRA
product ``W + s·ΔW`` (DoRA-normalised where ``use_dora``), a bias plus ``s·lora_B.bias``, embedding rows replaced by
trained tokens, or a tensor the adapter saves whole (``modules_to_save``, PEFT's ``bias: all``, a targeted
embedding's ``base_layer``). Everything after (classification, the planner's budget, the reader, the runner) reads
those sources, so an adapted model feeds any method (WIDEN included) within the budget.

Before anything is written, every adapter tensor must be used: each targets a tensor the model has, with the
shapes its ``r`` (``rank_pattern``, else ``r``) and the model's shapes imply, in a float dtype; a LoRA on the head of
a model that ties it to its embedding, DoRA on a Conv1D weight or an embedding, LoRA on convolutions and anything
else not applied exactly is refused, naming the tensor. An adapter whose ``base_model_name_or_path`` does not look
like the model it is applied to gets a warning in the plan.

References: ``MODEL+ADAPTER`` (mergekit's ``model+lora``) is split by :func:`split_reference`; an adapter folder given
alone as a model is applied to the base (:func:`adapter_inputs`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import AdapterError, PlanError
from .formats.checkpoint import Checkpoint, Located, load_checkpoint
from .formats.peft_adapter import PeftAdapter, is_adapter_folder, load_adapter
from .hub import is_hub_id
from .quantization import Dequantization
from .recipe import HEAD_NAMES, Recipe, is_conv1d_weight
from .sources import InputSource, StoredSource
from .sources.lora import LoraBiasSource, LoraSource, TokenRowsSource

#: the source a model tensor is read through before the adapter changes it (by stored name)
BaseOf = Callable[[str], InputSource]
#: the dtypes adapter tensors may be stored in (read into float32)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: adapter tensor name endings and what they are (PEFT ``LoraLayer.adapter_layer_names``, trainable tokens)
_ROLES = (
    (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "B_bias"),
    (".lora_embedding_A", "embedding_A"), (".lora_embedding_B", "embedding_B"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".token_adapter.trainable_tokens_delta", "tokens"), (".trainable_tokens_delta", "tokens"),
)


# ---- references ------------------------------------------------------------------------------------------------
def _names_something(text: str) -> bool:
    return Path(text).expanduser().exists() or is_hub_id(text)


def split_reference(text: str) -> tuple[str, str | None]:
    """``MODEL+ADAPTER`` → (``MODEL``, ``ADAPTER``); a reference without a usable ``+`` → (it, None).

    A path that exists is taken whole (a ``+`` can be part of a folder name); otherwise the ``+`` whose two sides
    each name a folder or a Hub ID splits it. Raises :class:`PlanError` when several ``+`` would (use ``--lora``)."""
    if "+" not in text or Path(text).expanduser().exists():
        return text, None
    if text.endswith("+") or text.startswith("+"):
        raise PlanError(f"{text!r}: MODEL+ADAPTER needs a model before the + and a LoRA adapter after it (or give the "
                        "adapter with --lora ADAPTER after --model MODEL)")
    splits = [(text[:i], text[i + 1:]) for i, ch in enumerate(text) if ch == "+"]
    valid = [(m, a) for m, a in splits if m and a and _names_something(m) and _names_something(a)]
    if len(valid) > 1:
        raise PlanError(f"{text!r} can be read as MODEL+ADAPTER in {len(valid)} ways ("
                        + ", ".join(f"{m!r} + {a!r}" for m, a in valid)
                        + "): give the adapter with --lora ADAPTER after --model MODEL")
    if valid:
        return valid[0]
    model, adapter = splits[0]
    if model and adapter and not Path(text).expanduser().exists():
        return model, adapter  # neither side exists: loading names what is missing
    return text, None


def split_inputs(base: str | Path, models: str | Path | Sequence[str | Path]) \
        -> tuple[Path, list[Path], tuple[Path | None, ...]]:
    """``base`` and ``models`` with their ``MODEL+ADAPTER`` references split (:func:`split_reference`): the base, the
    models, and one adapter per input (None for none), the base's first."""
    models = [models] if isinstance(models, (str, Path)) else list(models)
    pairs = [split_reference(str(ref)) for ref in (base, *models)]
    return (Path(pairs[0][0]), [Path(m) for m, _ in pairs[1:]],
            tuple(None if a is None else Path(a) for _, a in pairs))


def adapter_inputs(recipe: Recipe) -> Recipe:
    """``recipe`` with every model given as an adapter folder alone taken as that adapter on the base (``--model
    ADAPTER`` means ``--model BASE+ADAPTER``). Raises :class:`AdapterError` for an adapter where a model is needed
    (the base, or the model part of ``MODEL+ADAPTER``)."""
    adapters = list(recipe.adapters) or [None] * (1 + len(recipe.models))
    models = list(recipe.models)
    if is_adapter_folder(recipe.base):
        raise AdapterError(f"the base {recipe.base} is a LoRA adapter, not a model: give the model it applies to, "
                           f"--base MODEL+{recipe.base}")
    for k, model in enumerate(recipe.models, 1):
        if not is_adapter_folder(model):
            continue
        if adapters[k] is not None:
            raise AdapterError(f"model {k}: {model} is a LoRA adapter, not a model: write MODEL+ADAPTER with the model "
                               "the adapter applies to first")
        if adapters[0] is not None:
            raise AdapterError(f"model {k}: the adapter {model} would apply to the base, which has an adapter of its "
                               f"own ({adapters[0]}); one adapter per input: give it as MODEL+{model}")
        models[k - 1], adapters[k] = recipe.base, model
    for k, adapter in enumerate(adapters):
        if adapter is not None and not is_adapter_folder(adapter):
            who = "the base" if k == 0 else f"model {k}"
            if not Path(adapter).expanduser().exists():
                raise AdapterError(f"{who}'s adapter folder {adapter} does not exist")
            raise AdapterError(f"{who}'s adapter {adapter} is not a PEFT adapter folder (it holds no "
                               "adapter_config.json)")
    if not any(a is not None for a in adapters):
        return recipe
    if recipe.slices:
        raise PlanError("LoRA adapters (MODEL+ADAPTER) in a recipe with slices: are not supported yet")
    return dataclasses.replace(recipe, models=tuple(models), adapters=tuple(adapters))


def load_input(folder: Path, adapter: Path | None) -> Checkpoint:
    """The checkpoint of ``folder`` (headers only), with the adapter at ``adapter`` attached (parsed, not applied:
    :func:`adapted` applies it when the plan is made)."""
    ckpt = load_checkpoint(folder)
    return ckpt if adapter is None else dataclasses.replace(ckpt, adapter=load_adapter(adapter))


# ---- the decision ------------------------------------------------------------------------------------------------
def adapted_inputs(read_as: list[Dequantization]) -> tuple[list[Dequantization], list[str]]:
    """:func:`adapted` for every input (the base first, then the models), and the notes for the user."""
    out, notes = [], []
    for k, d in enumerate(read_as):
        d, more = adapted(d, "the base" if k == 0 else f"model {k}")
        out.append(d)
        notes += more
    return out, notes


def adapted(read_as: Dequantization, who: str) -> tuple[Dequantization, list[str]]:
    """How the checkpoint ``read_as`` reads is read with its adapter applied: ``read_as`` with the adapter's sources
    (``Dequantization.adapted``), and notes. Unchanged for a checkpoint without an adapter. Raises
    :class:`AdapterError` naming the tensor for anything that does not fit (see the module docstring)."""
    ckpt = read_as.checkpoint
    adapter = ckpt.adapter
    if adapter is None:
        return read_as, []
    sources = _Matcher(read_as, adapter, who).sources()
    return dataclasses.replace(read_as, adapted=sources), _notes(ckpt, adapter, who, sources)


class _Matcher:
    """Matches one adapter's tensors with one checkpoint's, building the sources (one use, see :func:`adapted`)."""

    def __init__(self, read_as: Dequantization, adapter: PeftAdapter, who: str) -> None:
        self.read_as, self.adapter, self.who = read_as, adapter, who
        self.ckpt = read_as.checkpoint
        self.settings = adapter.settings
        # by stored name: a view of a checkpoint may list tensors under other names
        self.stored = {loc.info.name: loc for loc in self.ckpt.tensors.values()}
        self.label = adapter.folder.name

    def fail(self, what: str) -> AdapterError:
        return AdapterError(f"LoRA adapter {self.adapter.folder} on {self.who} ({self.ckpt.folder}): {what}")

    def base_name(self, name: str, module: str) -> str:
        """The model's tensor that adapter name ``name`` (of ``module``) means: the same name, or the name without
        its first part (a model saved without ``transformer.``/``model.``, e.g. GPT-2 as stored on the Hub)."""
        candidates = [name] + ([name.split(".", 1)[1]] if "." in name else [])
        for candidate in candidates:
            if candidate in self.stored:
                if candidate in HEAD_NAMES and self.ckpt.tied(candidate):
                    raise self.fail(f"{module} changes {candidate}, which the model ties to its token embedding; PEFT "
                                    "would change the embedding with it. Not supported: untie the model first")
                return candidate
        if name in HEAD_NAMES and self.ckpt.tied(name):
            raise self.fail(f"{module} changes the output head, which the model ties to its token embedding (it "
                            "stores no head); PEFT would change the embedding with it. Not supported")
        raise self.fail(f"{module} targets {name}, which the model does not have (the adapter was made for another "
                        "architecture or naming)")

    def located(self, role: str, name: str) -> Located:
        loc = self.adapter.tensors[name]
        if loc.info.dtype.name not in FLOAT_DTYPES:
            raise self.fail(f"{name} ({role}) is stored as {loc.info.dtype.name}; adapter tensors must be "
                            f"{'/'.join(FLOAT_DTYPES)}")
        return loc

    def sources(self) -> dict[str, InputSource]:
        groups: dict[str, dict[str, str]] = {}  # module -> role -> adapter tensor name
        whole: dict[str, str] = {}  # model tensor -> adapter tensor that replaces it
        for name in self.adapter.tensors:
            role, module = _role(name)
            if role is None:
                if "lora_" in name or "trainable_tokens" in name:
                    raise self.fail(f"{name} is a LoRA tensor streammerge does not know (not lora_A/lora_B, "
                                    "lora_embedding_A/B, lora_magnitude_vector, lora_B.bias or trainable tokens)")
                target = self.base_name(name.replace(".base_layer.", "."), name)
                if target in whole:
                    raise self.fail(f"{name} and {whole[target]} both replace {target}")
                whole[target] = name
                continue
            if role in groups.setdefault(module, {}):
                raise self.fail(f"{module} has two {role} tensors")
            groups[module][role] = name
        replaced = {target: self.replacement(target, name) for target, name in whole.items()}

        def base_source(target: str) -> InputSource:
            loc = self.stored[target]
            return replaced.get(target) or self.read_as.sources.get(target) or StoredSource(loc)

        out: dict[str, InputSource] = dict(replaced)
        for module, roles in groups.items():
            made: dict[str, InputSource]
            if "tokens" in roles:
                if len(roles) > 1:
                    raise self.fail(f"{module} has both trainable tokens and LoRA tensors ({', '.join(sorted(roles))})")
                made = self.tokens(module, roles["tokens"], base_source)
            elif "embedding_A" in roles or "embedding_B" in roles:
                made = self.embedding(module, roles, base_source)
            else:
                made = self.linear(module, roles, base_source)
            for target, source in made.items():
                if target in out and target not in replaced:
                    raise self.fail(f"{target} is changed by two modules of the adapter")
                out[target] = source
        return out

    def replacement(self, target: str, name: str) -> InputSource:
        """A tensor the adapter saves whole (``modules_to_save``, ``bias: all``, a targeted layer's
        ``base_layer``): it replaces the model's, which it must match in shape."""
        loc, model = self.located("saved whole", name), self.stored[target]
        if loc.info.shape != model.info.shape:
            raise self.fail(f"{name} {list(loc.info.shape)} replaces {target}, which is {list(model.info.shape)} in the "
                            "model (a resized vocabulary or another model size)")
        return StoredSource(loc)

    def rank(self, module: str, name: str, r: int) -> None:
        want = self.settings.rank_of(module)
        if r != want:
            raise self.fail(f"{name} has rank {r}, but the adapter config gives {module} r={want} "
                            "(rank_pattern, else r)")

    def linear(self, module: str, roles: dict[str, str], base_source: BaseOf) -> dict[str, InputSource]:
        """A LoRA (or DoRA) on an ``nn.Linear`` or a ``Conv1D`` weight, and its ``lora_B.bias``."""
        for role in ("A", "B"):
            if role not in roles:
                raise self.fail(f"{module} has no lora_{role}.weight (found {', '.join(sorted(roles.values()))})")
        a, b = self.located("lora_A", roles["A"]), self.located("lora_B", roles["B"])
        if len(a.info.shape) != 2 or len(b.info.shape) != 2:
            raise self.fail(f"{roles['A']} is {len(a.info.shape)}-D: LoRA on convolution layers is not supported")
        target = self.base_name(module + ".weight", module)
        w = self.stored[target]
        if len(w.info.shape) != 2:
            raise self.fail(f"{module} targets {target} {list(w.info.shape)}, which is not a 2-D weight")
        r = a.info.shape[0]
        self.rank(module, roles["A"], r)
        # PEFT decides the layout by the layer's type (dispatch_default sets fan_in_fan_out to match it)
        transposed = is_conv1d_weight(self.ckpt.model_type, target)
        rows, cols = w.info.shape
        want_a, want_b = ((r, rows), (cols, r)) if transposed else ((r, cols), (rows, r))
        if a.info.shape != want_a or b.info.shape != want_b:
            layout = "a Conv1D weight stored [in, out]" if transposed else "an nn.Linear weight stored [out, in]"
            raise self.fail(f"{roles['A']} {list(a.info.shape)} and {roles['B']} {list(b.info.shape)} do not fit "
                            f"{target} {list(w.info.shape)}, {layout} (expected lora_A {list(want_a)} and lora_B "
                            f"{list(want_b)})")
        magnitude = None
        if self.settings.use_dora:
            if "magnitude" not in roles:
                raise self.fail(f"the config sets use_dora but {module} has no lora_magnitude_vector")
            if transposed:
                raise self.fail(f"DoRA on {target}, a Conv1D weight (fan_in_fan_out), is not supported: its norms run "
                                "down the stored columns, across every row chunk")
            magnitude = self.located("lora_magnitude_vector", roles["magnitude"])
            if magnitude.info.shape != (rows,):
                raise self.fail(f"{roles['magnitude']} {list(magnitude.info.shape)} does not fit {target} "
                                f"{list(w.info.shape)} (expected [{rows}])")
        elif "magnitude" in roles:
            raise self.fail(f"{roles['magnitude']} is a DoRA magnitude, but the config does not set use_dora")
        scale = self.settings.scale_of(module)
        out: dict[str, InputSource] = {target: LoraSource(base_source(target), a, b, scale, transposed,
                                                          magnitude, self.label)}
        if "B_bias" in roles:
            if not self.settings.lora_bias:
                raise self.fail(f"{roles['B_bias']} is a LoRA bias, but the config does not set lora_bias")
            bias = self.located("lora_B.bias", roles["B_bias"])
            bias_target = target[: -len("weight")] + "bias"
            if bias_target not in self.stored:
                raise self.fail(f"{roles['B_bias']} changes {bias_target}, which the model does not have (PEFT "
                                "refuses lora_bias on a layer without a bias)")
            want = (cols,) if transposed else (rows,)
            if bias.info.shape != want or self.stored[bias_target].info.shape != want:
                raise self.fail(f"{roles['B_bias']} {list(bias.info.shape)} does not fit {bias_target} "
                                f"{list(self.stored[bias_target].info.shape)}")
            out[bias_target] = LoraBiasSource(base_source(bias_target), bias, scale, self.label)
        elif self.settings.lora_bias:
            raise self.fail(f"the config sets lora_bias but {module} has no lora_B.bias")
        return out

    def embedding(self, module: str, roles: dict[str, str], base_source: BaseOf) -> dict[str, InputSource]:
        """A LoRA on an embedding [V, H]: ``lora_embedding_A`` [r, V], ``lora_embedding_B`` [H, r]."""
        extra = set(roles) - {"embedding_A", "embedding_B"}
        if extra or len(roles) != 2:
            if "magnitude" in roles:
                raise self.fail(f"DoRA on the embedding {module} is not supported")
            raise self.fail(f"{module} needs lora_embedding_A and lora_embedding_B, and nothing else (found "
                            f"{', '.join(sorted(roles.values()))})")
        a = self.located("lora_embedding_A", roles["embedding_A"])
        b = self.located("lora_embedding_B", roles["embedding_B"])
        target = self.base_name(module + ".weight", module)
        w = self.stored[target]
        if len(w.info.shape) != 2 or len(a.info.shape) != 2 or len(b.info.shape) != 2:
            raise self.fail(f"{module}: lora_embedding_A, lora_embedding_B and {target} must be 2-D")
        r = a.info.shape[0]
        self.rank(module, roles["embedding_A"], r)
        vocab, hidden = w.info.shape
        if a.info.shape != (r, vocab) or b.info.shape != (hidden, r):
            raise self.fail(f"{roles['embedding_A']} {list(a.info.shape)} and {roles['embedding_B']} "
                            f"{list(b.info.shape)} do not fit the embedding {target} {list(w.info.shape)} (expected "
                            f"[{r}, {vocab}] and [{hidden}, {r}])")
        if self.settings.use_dora:
            raise self.fail(f"DoRA on the embedding {module} is not supported")
        scale = self.settings.scale_of(module)
        return {target: LoraSource(base_source(target), a, b, scale, True, None, self.label)}

    def tokens(self, module: str, name: str, base_source: BaseOf) -> dict[str, InputSource]:
        """Trainable token rows of an embedding (``trainable_token_indices``)."""
        entries = self.settings.trainable_token_indices
        ids = next((i for m, i in entries if m is not None and (module == m or module.endswith("." + m))), None)
        if ids is None:
            unnamed = [i for m, i in entries if m is None]
            ids = unnamed[0] if len(unnamed) == 1 else None
        if ids is None:
            raise self.fail(f"{name} holds trained token rows, but trainable_token_indices in the config names no "
                            f"token ids for {module}")
        values = self.located("trainable tokens", name)
        target = self.base_name(module + ".weight", module)
        w = self.stored[target]
        if len(w.info.shape) != 2 or values.info.shape != (len(ids), w.info.shape[1]):
            raise self.fail(f"{name} {list(values.info.shape)} does not fit {len(ids)} token rows of {target} "
                            f"{list(w.info.shape)}")
        outside = [i for i in ids if i >= w.info.shape[0]]
        if outside:
            raise self.fail(f"trainable_token_indices names token {outside[0]}, but {target} has "
                            f"{w.info.shape[0]} rows")
        tokens = tuple(sorted((t, j) for j, t in enumerate(ids)))
        return {target: TokenRowsSource(base_source(target), values, tokens, self.label)}


def _role(name: str) -> tuple[str | None, str]:
    for suffix, role in _ROLES:
        if name.endswith(suffix):
            return role, name[: -len(suffix)]
    return None, name


def _notes(ckpt: Checkpoint, adapter: PeftAdapter, who: str, sources: dict[str, InputSource]) -> list[str]:
    s = adapter.settings
    kinds = {}
    for source in sources.values():
        kinds[source.kind] = kinds.get(source.kind, 0) + 1
    what = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items()))
    detail = [f"r={s.r}", f"lora_alpha={s.lora_alpha:g}"] + [k for k in ("use_rslora", "use_dora") if getattr(s, k)] \
        + (["rank_pattern"] if s.rank_pattern else []) + (["alpha_pattern"] if s.alpha_pattern else [])
    notes = [f"{who} is {ckpt.folder} with the LoRA adapter {adapter.folder} ({', '.join(detail)}) merged in on the "
             f"fly: {len(sources)} tensor(s) change ({what})"]
    trained_on = s.base_model_name_or_path
    if trained_on and not _same_model(trained_on, ckpt):
        notes.append(f"WARNING: the adapter {adapter.folder} was trained on {trained_on!r} (its "
                     f"base_model_name_or_path) and is applied to {ckpt.folder}: check that this is the model (or "
                     "the fine-tune) you mean")
    return notes


def _same_model(trained_on: str, ckpt: Checkpoint) -> bool:
    """Whether the adapter's ``base_model_name_or_path`` plausibly names ``ckpt``: the same last name (a folder, a
    Hub ID, a Hub snapshot's repository, or config.json's ``_name_or_path``), ignoring case."""
    def last(text: str) -> str:
        return re.split(r"[/\\]", text.rstrip("/\\"))[-1].lower()

    folder = ckpt.folder.resolve()
    names = {folder.name.lower()}
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        names.add(folder.parent.parent.name.split("--")[-1].lower())  # the Hugging Face cache's models--org--name
    if isinstance(ckpt.config.get("_name_or_path"), str):
        names.add(last(ckpt.config["_name_or_path"]))
    return last(trained_on) in names
