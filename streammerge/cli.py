"""The ``streammerge`` command line: merge, plan, inspect, methods, make-example.

Flags build a :class:`Recipe`; everything else is the Python API. User errors (bad input, impossible budget)
exit with status 1 and one clear message; bad usage exits 2. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import api
from ._version import __version__
from .analysis.command import analyze_command
from .cli_types import ModelReference
from .errors import StreamMergeError
from .examples import SHAPES, model_bytes, write_example
from .execute import execute
from .lora import split_reference
from .manifest import MANIFEST
from .methods import all_methods, method_origin, plugin_problems
from .output import check_not_moved, work_folder_for
from .parts import (
    WorkUnit,
    parse_part,
    part_recipe,
    part_states,
    plan_parts,
    plugin_problem,
    recorded_plugin,
    split_summary,
)
from .parts import finalize as finalize_parts
from .planner import VARIES, Plan
from .progress import RunSummary
from .recipe import DEFAULT_SHARD_SIZE, Recipe, tokenizer_source_fields
from .stopping import MergeInterrupted
from .units import format_size
from .verify import verify_output
from .workfolder import describe_destination


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise click.UsageError(f"--param {item!r}: write NAME=VALUE, e.g. --param t=1.0 or --param weight=0.3,0.7")
        if name in params:
            raise click.UsageError(f"--param {name} given twice")
        params[name] = value
    return params


def _merge_options(f: Any, out_required: bool = True) -> Any:
    """The options shared by ``merge`` and ``plan``."""
    options = [
        click.argument("recipe_file", required=False, type=click.Path(path_type=Path), metavar="[RECIPE.yaml]"),
        click.option("--base", "base", type=ModelReference(),
                     help="Base model folder, or Hub ID org/name[@revision] from the Hugging Face cache (the common "
                          "ancestor the others were trained from); required without a recipe."),
        click.option("--model", "models", multiple=True, type=ModelReference(),
                     help="A model folder (or Hub ID) to merge; repeat for each (order matters for per-model "
                          "parameters); required without a recipe. MODEL+ADAPTER merges a PEFT LoRA adapter into "
                          "MODEL on the fly (mergekit's model+lora; nothing is materialised), and a LoRA adapter "
                          "folder alone means BASE+ADAPTER. --base takes MODEL+ADAPTER too."),
        click.option("--lora", "loras", multiple=True, type=click.Path(path_type=Path), metavar="ADAPTER",
                     help="A PEFT LoRA adapter folder (or Hub ID) for the --model just before it (the same as "
                          "--model MODEL+ADAPTER, for paths that contain a +)."),
        click.option("--out", "out", required=out_required, type=click.Path(path_type=Path),
                     help="Output folder; it appears only when the merge is complete." if out_required else
                     "Output folder of the merge to describe (optional: the plan says what a merge would do with it)."),
        click.option("--method", default=None,
                     help="Merge method (default widen); `streammerge methods` lists them with their parameters."),
        click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="Method parameter, repeatable (e.g. --param t=1.0 --param s=1.0). Per-model parameters "
                          "take one value per --model separated by commas, or one value for all."),
        click.option("--max-ram", default=None, metavar="SIZE",
                     help="RAM for the merge's buffers, e.g. 512MiB or 6GiB (default: half of the available RAM, "
                          "within any memory cgroup limit). "
                          "Sets the chunk size; the output does not depend on it."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help="Where the arithmetic runs: auto uses a CUDA GPU when one is present, else the CPU. "
                          "CPU and GPU results agree within float tolerance (not bit for bit)."),
        click.option("--max-vram", default=None, metavar="SIZE",
                     help="GPU memory for the merge's tensors with a CUDA device, e.g. 8GiB (default: 80% of the "
                          "free GPU memory); sets the chunk size with --max-ram."),
        click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                     help="CPU threads to keep busy (default: the CPUs this process may use: its affinity mask "
                          "and cgroup CPU quota). On the CPU, up to N tensors are merged at once within --max-ram; "
                          "the output does not depend on N."),
        click.option("--dtype", default=None, metavar="DTYPE",
                     help="Output dtype: bfloat16, float16 or float32 (default: each tensor keeps the base's dtype)."),
        click.option("--exclude", multiple=True, metavar="REGEX",
                     help="Tensors whose names match REGEX from the start (Python re.match: write '.*mlp' for a part in "
                          "the middle) keep the base's value; repeatable. A pattern that matches no tensor is an "
                          "error."),
        click.option("--embedding", "embeddings", multiple=True, metavar="NAME",
                     help="Tensor names to treat as embeddings (one column per stored row); repeatable. "
                          "Default: the usual token/position embedding names of each architecture; giving any "
                          "replaces that list. Each must be a 2-D tensor of the base."),
        click.option("--keep-vision", is_flag=True,
                     help="For a vision-language model: the vision tower and projector keep the base's values "
                          "(default: merged like the rest)."),
        click.option("--seed", type=int, default=None,
                     help="Seed for the methods that draw random masks (those with a seed parameter in `streammerge "
                          "methods`: the DARE and DELLA families); default 0. Other methods refuse it."),
        click.option("--tokenizer-source", default=None, metavar="base|union|FOLDER",
                     help="The output's tokenizer, as mergekit's tokenizer_source: base, a model FOLDER (or Hub "
                          "ID), or union (the base's tokens and every model's it lacks). The token embedding and head "
                          "rows of every input are mapped through its own tokenizer.json onto that vocabulary, so "
                          "inputs may differ in vocabulary. Default: the base's tokenizer files, rows merged as "
                          "stored."),
        click.option("--tokenizer-from", type=click.Path(path_type=Path), default=None, hidden=True,
                     help="The same as --tokenizer-source FOLDER."),
        click.option("--shard-size", default=None, metavar="SIZE",
                     help=f"Largest output shard (default {DEFAULT_SHARD_SIZE // 1000**3}GB)."),
        click.option("--chunk-rows", type=click.IntRange(min=1), default=None, hidden=True,
                     help="Force the rows per chunk (testing)."),
        click.option("--offline", is_flag=True,
                     help="Resolve Hub IDs (org/name[@revision]) from the local Hugging Face cache only (as "
                          "HF_HUB_OFFLINE=1 does); without it, missing files of a Hub ID are downloaded."),
        click.option("--force", is_flag=True, help="Replace the output folder if it exists and is not empty."),
        click.option("--restart", is_flag=True,
                     help="Discard an interrupted run's work folder for --out instead of continuing it."),
        click.option("--redo-changed", is_flag=True,
                     help="Continue an interrupted run whose inputs or options changed: keep the work of the tensors "
                          "the change does not affect and redo the others."),
        click.option("--allow-incomplete-output", is_flag=True,
                     help="Write the merge even when the output could not be loaded by transformers (a base without "
                          "config.json)."),
        click.option("--no-journal", "no_journal", is_flag=True, hidden=True,
                     help="Do not journal or fsync (not resumable; for measuring the journal's cost)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


#: options that say what is merged: a recipe says it instead (the command line says how the merge runs)
_RECIPE_DECIDES = {"base": "--base", "models": "--model", "loras": "--lora", "method": "--method", "params": "--param",
                   "seed": "--seed",
                   "dtype": "--dtype", "exclude": "--exclude", "embeddings": "--embedding",
                   "keep_vision": "--keep-vision", "tokenizer_from": "--tokenizer-from",
                   "tokenizer_source": "--tokenizer-source", "shard_size": "--shard-size"}
_HOW_IT_RUNS = ("out", "max_ram", "device", "max_vram", "threads", "chunk_rows", "force", "restart", "redo_changed",
                "allow_incomplete_output", "offline")


def _recipe(kw: dict[str, Any]) -> Recipe:
    if kw["recipe_file"] is not None:
        given = [flag for key, flag in _RECIPE_DECIDES.items() if kw[key] not in (None, (), False)]
        if given:
            raise click.UsageError(f"{', '.join(given)}: the recipe {kw['recipe_file']} says what is merged; change "
                                   "it there (the command line takes how the merge runs: --out, --max-ram, --device, "
                                   "--force, ...)")
        return Recipe.from_yaml(kw["recipe_file"], journal=not kw["no_journal"],
                                **{k: kw[k] for k in _HOW_IT_RUNS})
    for key, flag in (("base", "--base"), ("models", "--model")):
        if not kw[key]:
            raise click.UsageError(f"Missing option '{flag}' (or give a recipe: streammerge merge RECIPE.yaml --out "
                                   "DIR)")
    base, models, adapters = _inputs(kw["base"], kw["models"], kw["loras"])
    params = _parse_params(kw["params"])
    if kw["seed"] is not None:
        if "seed" in params:
            raise click.UsageError("give the seed once: --seed N or --param seed=N")
        params["seed"] = str(kw["seed"])
    return Recipe(
        base=base, models=models, adapters=adapters, out=kw["out"], method=kw["method"] or "widen",
        params=params, dtype=kw["dtype"], exclude=kw["exclude"],
        embedding_names=kw["embeddings"] or None, **_tokenizer_source(kw["tokenizer_source"], kw["tokenizer_from"]),
        shard_size=kw["shard_size"] or DEFAULT_SHARD_SIZE,
        max_ram=kw["max_ram"], device=kw["device"], max_vram=kw["max_vram"], threads=kw["threads"],
        chunk_rows=kw["chunk_rows"], force=kw["force"], restart=kw["restart"],
        redo_changed=kw["redo_changed"], allow_incomplete_output=kw["allow_incomplete_output"],
        keep_vision=kw["keep_vision"], offline=kw["offline"],
        journal=not kw["no_journal"],
    )


def _tokenizer_source(source: str | None, folder: Path | None) -> dict[str, Any]:
    """The Recipe fields of --tokenizer-source (and its older spelling --tokenizer-from FOLDER)."""
    if source is not None and folder is not None:
        raise click.UsageError("give --tokenizer-source once (--tokenizer-from FOLDER is the same as "
                               "--tokenizer-source FOLDER)")
    return tokenizer_source_fields(source if source is not None else folder)


#: where --lora values sit among the --model values, by command (click keeps each option's values apart)
_LORA_AFTER = "streammerge.lora_after"


class _InputsCommand(click.Command):
    """A command whose ``--lora ADAPTER`` belongs to the ``--model`` given just before it: before click parses the
    arguments, note for each ``--lora`` how many ``--model`` options came before it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        after, models = [], 0
        tokens = iter(args)
        for token in tokens:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if name in ("--model", "--lora") and "=" not in token:
                next(tokens, None)  # the option's value (a value "--lora" is a folder name, not an option)
            if name == "--model":
                models += 1
            elif name == "--lora":
                after.append(models)
        ctx.meta[_LORA_AFTER] = after
        return super().parse_args(ctx, args)


def _inputs(base: Path | None, models: tuple[Path, ...], loras: tuple[Path, ...]) \
        -> tuple[Path | None, list[Path], tuple[Path | None, ...]]:
    """The base and models with their LoRA adapters: MODEL+ADAPTER split, and each --lora given to the --model
    before it; the adapters are one per input, the base's first."""
    refs = [split_reference(str(base)) if base is not None else (None, None), *(split_reference(str(m))
                                                                             for m in models)]
    adapters: list[str | None] = [a for _, a in refs]
    after = click.get_current_context().meta.get(_LORA_AFTER, [])
    for adapter, k in zip(loras, after):
        if k == 0:
            raise click.UsageError(f"--lora {adapter}: an adapter belongs to the --model before it, and none comes "
                                   "before it (for the base, write --base MODEL+ADAPTER)")
        if adapters[k] is not None:
            raise click.UsageError(f"--lora {adapter}: model {k} ({models[k - 1]}) already has the adapter "
                                   f"{adapters[k]}; one adapter per model")
        adapters[k] = str(adapter)
    return (None if refs[0][0] is None else Path(refs[0][0]), [Path(m) for m, _ in refs[1:]],
            tuple(None if a is None else Path(a) for a in adapters))


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more; --json lists all)" if len(names) > shown
                                       else "")


def _chunking_line(tensors: list[dict[str, Any]]) -> str:
    chunked = [t for t in tensors if t["chunks"] > 1]
    if not chunked:
        return "chunks      every tensor in one chunk"
    most = max(chunked, key=lambda t: t["chunks"])
    return (f"chunks      {len(chunked)} tensor(s) in row chunks (the most: {most['name']}, {most['chunks']} chunks of "
            f"{most['chunk_rows']} rows), the rest in one chunk each")


def _with_adapter(d: dict[str, Any], k: int, folder: str) -> str:
    """Input ``k`` (0: the base) of a plan's JSON, with its LoRA adapter if it has one."""
    adapter = (d.get("adapters") or [None] * (k + 1))[k]
    return folder if adapter is None else f"{folder} + LoRA adapter {adapter}"


def _print_plan_summary(d: dict[str, Any], stream: Any) -> None:
    from .kernels import RUNTIME_BYTES  # noqa: PLC0415
    lines = [
        f"method      {d['method']} ({', '.join(f'{k}={v}' for k, v in d['params'].items()) or 'no parameters'})"
        + ("; --json lists each tensor's" if VARIES in d["params"].values() else ""),
        f"base        {_with_adapter(d, 0, d['base'])}",
        *(f"model {i + 1:<5} {_with_adapter(d, i + 1, m)}" for i, m in enumerate(d["models"])),
        f"output      {d['out'] or '(no --out)'} ({len(d['shards'])} shard(s), {format_size(d['bytes_written'])})",
        *([f"destination {d['destination']}"] if d.get("destination") else []),
        f"device      {d['device']}" + (f" ({d['device_source']})" if d.get("device_source") else ""),
        f"budget      {format_size(d['budget']['max_ram'])} ({d['budget']['source']})",
        f"threads     {d['budget']['threads']} ({d['budget']['threads_source']}): {d['workers']} tensor(s) merged at "
        "once" + (" (one per GPU)" if d['device'] != "cpu" else ""),
        f"peak RAM    {format_size(d['predicted_peak_ram'])} predicted for buffers (plus the interpreter)"
        + (f"; {format_size(RUNTIME_BYTES)} of it for the fused kernels' runtime" if d.get("fused_kernels") else ""),
        *([f"GPU memory  {format_size(d['budget']['max_vram'])} ({d['budget']['vram_source']}); "
           f"{format_size(d['predicted_peak_vram'])} predicted for tensors"] if d.get("predicted_peak_vram") else []),
        ("reads once  every tensor: no statistics passes" if not d["read_once"] + d["read_per_pass"] else
         f"reads once  {d['read_once']} tensor(s) with statistics passes are read once (they fit the budget whole); "
         f"{d['read_per_pass']} are read again for each pass"),
        _chunking_line(d["tensors"]),
        f"reads       {format_size(d['bytes_read'])}" + (
            f" at most; about {format_size(d['bytes_read_settled'])} where each selection's first pass settles its "
            "second, usual with 16-bit inputs" if d["bytes_read_settled"] < d["bytes_read"] else ""),
        "tensors     " + ", ".join(f"{n} {rule}" for rule, n in sorted(d["rules"].items())),
        *(f"{'copied' if why in ('passthrough', 'copy') else 'base value':<11} {len(names)} ({why}): {_some(names)}"
          for why, names in d.get("kept_from_base", {}).items()),
        *(f"note        {note}" for note in d.get("notes", ()) if d.get("destination")),
    ]
    click.echo("\n".join(lines), file=stream)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="streammerge")
def main() -> None:
    """Merge homologous LLM checkpoints (a base and its fine-tuned or continually pre-trained variants)
    within a memory budget, streaming row chunks from safetensors files.

    \b
    A first merge:
      streammerge make-example demo
      streammerge merge --base demo/base --model demo/chat --model demo/multilingual --out demo/merged

    An interrupted merge (Ctrl-C, crash, full disk) continues where it stopped: run the same command again, or
    `streammerge resume OUT`. `streammerge methods` lists the methods and their parameters.

    \b
    PEFT LoRA adapters are inputs too, merged in on the fly (nothing is materialised):
      streammerge merge --base BASE --model BASE+ADAPTER1 --model BASE+ADAPTER2 --out DIR
      streammerge apply MODEL+ADAPTER --out DIR      (PEFT's merge_and_unload, streamed)
    """


def _distribution_options(f: Any) -> Any:
    """``merge``'s options for running beyond one process (see streammerge.parts and streammerge.ray_executor)."""
    options = [
        click.option("--part", default=None, metavar="K/N",
                     help="Write only part K of N (each part owns whole output shard files) into OUT's work folder, "
                          "with its own journal; run every part (any machines sharing the storage, at the same "
                          "time or not), then `streammerge finalize OUT`. Each part resumes on its own."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="ray: run the parts as Ray tasks, one per part, and publish (needs streammerge[ray])."),
        click.option("--ray-address", default=None, metavar="ADDR",
                     help="With --executor ray: the cluster to join, HOST:PORT of its head (`ray start --head` prints "
                          "it), or ray://HOST:PORT; 'local' starts a new cluster on this machine for this merge. "
                          "Default, as Ray decides: RAY_ADDRESS, else the cluster the last `ray start` started on "
                          "this machine, else a new local one (the merge says which it uses). Refused within seconds "
                          "if nothing answers there."),
        click.option("--parts", type=click.IntRange(min=1), default=None, metavar="N",
                     help="With --executor ray: how many parts (default: as many as the work folder is already split "
                          "into, else one per node, or per GPU on CUDA, at most one per output shard file)."),
        click.option("--resize-shards", is_flag=True,
                     help="With --part or --executor ray: if the output has fewer shard files than parts, lower "
                          "--shard-size so each part gets one (streammerge_recipe.yaml records the size)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command(cls=_InputsCommand)
@_merge_options
@_distribution_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge(as_json: bool, quiet: bool, part: str | None, executor: str, ray_address: str | None, parts: int | None,
          resize_shards: bool, **kw: Any) -> None:
    """Merge --model folders onto --base with --method, writing --out; or run a recipe (mergekit's YAML schema:
    merge_method, base_model, models with parameters, gradients and filters).

    \b
    Example (WIDEN, the paper's settings, 4 GiB of RAM):
      streammerge merge --base Qwen1.5-7B --model Qwen1.5-7B-Chat --model Sailor-7B \\
          --method widen --param t=1.0 --param s=1.0 --max-ram 4GiB --out merged
    A mergekit recipe, unchanged:
      streammerge merge recipe.yaml --out merged --max-ram 4GiB
    Every output holds streammerge_recipe.yaml, which reruns its merge.

    \b
    Beyond one machine (byte-identical to one process):
      streammerge merge ... --out merged --part 2/4     (on each machine, K = 1..4)
      streammerge finalize merged
      streammerge merge ... --out merged --executor ray --ray-address HEAD:6379
    """
    if part is not None and executor == "ray":
        raise click.UsageError("--part runs one part here and --executor ray runs every part: give one of them")
    if executor != "ray" and (ray_address is not None or parts is not None):
        raise click.UsageError("--ray-address and --parts go with --executor ray (one process per part: --part K/N)")
    if resize_shards and part is None and executor != "ray":
        raise click.UsageError("--resize-shards goes with --part K/N or --executor ray")
    try:
        recipe = _recipe(kw)
        where = None if part is None else parse_part(part)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if executor == "ray":
        _run_ray(recipe, as_json, quiet, ray_address, parts, resize_shards)
        return
    _run(recipe, as_json, quiet, where, resize_shards)


def _run(recipe: Recipe, as_json: bool, quiet: bool, part: tuple[int, int] | None = None,
         resize_shards: bool = False) -> None:
    """Plan and execute (only part K of N with ``part``); interruptions exit 130/143 with how to resume. Ends with
    the run's summary line (stderr) and where the model is (stdout), or one JSON object."""
    summaries: list[RunSummary] = []
    unit = None
    try:
        plan = api.plan_recipe(recipe) if part is None else plan_parts(recipe, part[1], resize_shards)
        unit = None if part is None else plan.units(part[1])[part[0] - 1]
        d = plan.to_dict()
        if not quiet and not as_json:
            _print_plan_summary(d, sys.stderr)
            if unit is not None:
                click.echo(f"part        {unit.describe()}", err=True)
        out = execute(plan, show_progress=not quiet and not as_json, handle_signals=True,
                      notify=lambda message: click.echo(f"note: {message}", err=True), report=summaries.append,
                      unit=unit)
        if unit is not None:
            _report_part(plan, unit, summaries[0] if summaries else None, as_json, quiet)
            return
    except MergeInterrupted as exc:
        click.echo(f"Interrupted: {exc}", err=True)
        sys.exit(exc.exit_code)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    summary = summaries[0] if summaries else None
    if as_json:
        click.echo(json.dumps({"out": str(out), "already_complete": summary is None, "fingerprint": d["fingerprint"],
                               "bytes_written": d["bytes_written"],
                               "device": plan.budget.device, "summary": summary and summary.to_dict(),
                               **({"peak_vram": summary.peak_vram} if summary and summary.peak_vram is not None
                                  else {})}))
        return
    if summary is None:  # a finished output of the same merge was there
        click.echo(f"{out} is already complete: nothing to do")
        return
    if not quiet:
        click.echo(summary.line(), err=True)
    click.echo(f"merged model written to {out}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--max-ram", default=None, metavar="SIZE",
              help="RAM budget for the rest of the merge (default: the interrupted run's --max-ram, if it had one).")
@click.option("--max-vram", default=None, metavar="SIZE",
              help="GPU memory for the rest of the merge (default: the interrupted run's --max-vram, if it had one).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for the rest of the merge (default: the interrupted run's --threads, if it had one; "
                   "else the CPUs this process may use). The output does not depend on it.")
@click.option("--redo-changed", is_flag=True,
              help="The inputs changed since the run was interrupted: keep the work of the tensors the change does "
                   "not affect and redo the others.")
@click.option("--restart", is_flag=True,
              help="Discard the interrupted run's work and merge again from the start, with the same options.")
@click.option("--part", default=None, metavar="K/N",
              help="Continue part K of N of a merge run in parts (merge --part K/N); then `streammerge finalize`. "
                   "Its --max-ram, --max-vram and --threads: those given now, else those part K ran with, else (a "
                   "part that never ran) this machine's defaults; never another part's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def resume(out: Path, max_ram: str | None, max_vram: str | None, threads: int | None, redo_changed: bool,
           restart: bool, part: str | None, as_json: bool, quiet: bool) -> None:
    """Continue an interrupted merge into OUT (same as rerunning the original merge command)."""
    work = work_folder_for(out)
    plan_file = work / "plan.json"
    if not plan_file.is_file():
        if (out / MANIFEST).is_file():
            click.echo(json.dumps({"out": str(out), "already_complete": True, "summary": None}) if as_json else
                       f"{out} is already complete: nothing to resume")
            return
        raise click.ClickException(f"no interrupted merge for {out} (no {plan_file})")
    try:
        where = None if part is None else parse_part(part)
        record = json.loads(plan_file.read_text(encoding="utf-8"))
        # a part continues with the budget it ran with, or (never run) this machine's, not the first part's
        stored = record["recipe"] if where is None else part_recipe(work, record["recipe"], *where)
        recipe = Recipe.from_json(stored, max_ram=max_ram, max_vram=max_vram, threads=threads,
                                  redo_changed=redo_changed or None,
                                  restart=restart or None)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise click.ClickException(f"{plan_file} is damaged ({exc}); start over with the original merge command "
                                   "and --restart") from None
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        check_not_moved(recipe.out, out)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    problem = plugin_problem(recipe.method, recorded_plugin(record), "on this machine")
    if problem:
        raise click.ClickException(f"cannot resume {out} here: {problem}; then run the same command again")
    _run(recipe, as_json, quiet, where)


def _report_part(plan: Plan, unit: WorkUnit, summary: RunSummary | None, as_json: bool, quiet: bool) -> None:
    """After ``--part K/N``: what it did, and which parts are still to run before ``finalize``."""
    out = plan.recipe.out
    if summary is None and not work_folder_for(out).is_dir():  # the whole merge was finalized before
        click.echo(json.dumps({"out": str(out), "part": unit.label, "already_complete": True, "summary": None})
                   if as_json else f"{out} is already complete: nothing to do")
        return
    left = [s for s in part_states(plan, unit.count) if s.state != "complete"]
    if as_json:
        click.echo(json.dumps({"out": str(out), "part": unit.label, "shards": list(unit.shards),
                               "already_complete": False, "fingerprint": plan.fingerprint,
                               "summary": summary and summary.to_dict(),
                               "parts_left": [{"part": s.unit.label, "state": s.state} for s in left]}))
        return
    if summary is not None and not quiet:
        click.echo(summary.line(), err=True)
    click.echo(f"part {unit.label} done: {len(unit.shards)} shard file(s) in {work_folder_for(out) / 'model'}")
    if left:
        click.echo("still to run before `streammerge finalize " + f"{out}`: "
                   + ", ".join(f"part {s.unit.label} ({s.state})" for s in left))
    else:
        click.echo(f"every part is done: run `streammerge finalize {out}` to publish the merge")


def _run_ray(recipe: Recipe, as_json: bool, quiet: bool, address: str | None, parts: int | None,
             resize_shards: bool) -> None:
    """``merge --executor ray``: every part as a Ray task, then finalize (see streammerge.ray_executor)."""
    from .ray_executor import merge_on_ray  # noqa: PLC0415 (Ray is optional)

    try:
        result = merge_on_ray(recipe, parts, address, resize_shards, show_progress=not quiet and not as_json,
                              notify=lambda message: click.echo(f"note: {message}", err=True), handle_signals=True)
    except MergeInterrupted as exc:
        click.echo(f"Interrupted: {exc}", err=True)
        sys.exit(exc.exit_code)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "already_complete": result.already_complete,
                               "executor": "ray", "parts": result.parts}))
        return
    if result.already_complete:
        click.echo(f"{result.out} is already complete: nothing to do")
        return
    if not quiet:
        for r in result.parts:
            line = RunSummary(**{k: v for k, v in r["summary"].items() if k != "read_rate"}).line() \
                if r.get("summary") else "done before"
            click.echo(f"part {r['part']} on {r.get('host', '?')}: {line}", err=True)
    n = len(result.parts)
    click.echo(f"merged model written to {result.out} ({n} part{'s' if n != 1 else ''} on Ray)")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--recheck", is_flag=True,
              help="Read every part's bytes again and check them against the journals (by default only the files "
                   "modified since their part checked them as it ended).")
def finalize(out: Path, as_json: bool, quiet: bool, recheck: bool) -> None:
    """Publish a merge run in parts (`merge ... --part K/N` for every K): check that every part is complete and that
    its bytes match their journaled CRC-32s, then write the index, side files, manifest and model card and move the
    folder into place, exactly as one process would. A missing or unfinished part is named, and nothing changes."""
    try:
        done = finalize_parts(out, show_progress=not quiet and not as_json, recheck=recheck)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"out": str(out), "already_complete": not done}))
    else:
        click.echo(f"merged model written to {out}" if done else f"{out} is already complete: nothing to do")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify(out: Path, as_json: bool) -> None:
    """Check a merged folder: headers, index, and every tensor's CRC-32 against the manifest."""
    try:
        problems, summary = verify_output(out)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({**summary, "ok": not problems, "problems": problems}, indent=2))
    else:
        for p in problems:
            click.echo(f"MISMATCH {p}", err=True)
        if not problems:
            click.echo(f"OK: {summary['tensors']} tensors in {summary['files']} file(s) match the manifest")
    if problems:
        if not as_json:
            click.echo(f"{len(problems)} problem(s) in {out}", err=True)
        sys.exit(1)


@main.command("plan", cls=_InputsCommand)
@(lambda f: _merge_options(f, out_required=False))
@click.option("--parts", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also show how the merge would be split into N parts (merge --part K/N, or --executor ray "
                   "--parts N): each part's shard files, tensors and bytes, and how balanced they are.")
@click.option("--resize-shards", is_flag=True,
              help="With --parts: as merge does, lower --shard-size if there are fewer shard files than parts.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole plan (every tensor) as JSON; with --parts, the split under \"split\".")
def plan_cmd(as_json: bool, parts: int | None, resize_shards: bool, **kw: Any) -> None:
    """Show what a merge would do (shards, chunking, memory, bytes, and what it would do with --out) without
    reading tensor data or writing anything; with --parts N, how it would be split into N parts."""
    if resize_shards and parts is None:
        raise click.UsageError("--resize-shards goes with --parts N")
    try:
        recipe = _recipe(kw)
        p = api.plan_recipe(recipe, dry_run=True) if parts is None else plan_parts(recipe, parts, resize_shards, True)
        d = {**p.to_dict(), "destination": describe_destination(p)}
        if parts is not None:
            d["split"] = split_summary(p, parts)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    _print_plan_summary(d, sys.stdout)
    if parts is not None:
        _print_split(d["split"], recipe.shard_size, sys.stdout)


def _print_split(split: dict[str, Any], asked: int | str, stream: Any) -> None:
    """``plan --parts N``: each part's files, tensors and bytes, and the balance."""
    n = split["parts"]
    resized = (f"; --resize-shards lowered --shard-size to {split['shard_size']}B"
               if split["shard_size"] != asked else "")
    lines = [f"split       {n} part(s) of whole shard files ({split['files']} in all{resized}), balanced by bytes "
             "moved (inputs read once + output written)"]
    for u in split["units"]:
        files = ", ".join(u["shards"][:2]) + (", ..." if len(u["shards"]) > 2 else "")
        lines.append(f"  part {u['part']:<7} {format_size(u['bytes']):>10}  {u['files']} file(s), {u['tensors']} "
                     f"tensor(s), {format_size(u['output_bytes'])} written: {files}")
    lines.append(f"balance     the largest part moves {format_size(split['largest'])}, {split['imbalance']:.2f}x the "
                 f"mean (the smallest {format_size(split['smallest'])}): {n} parts at once are at most "
                 f"{split['speedup_bound']:.2f}x as fast as one")
    click.echo("\n".join(lines), file=stream)


@main.command()
@click.argument("model", type=click.Path(path_type=Path), metavar="MODEL+ADAPTER")
@click.option("--lora", type=click.Path(path_type=Path), default=None, metavar="ADAPTER",
              help="The PEFT LoRA adapter folder (or Hub ID), instead of MODEL+ADAPTER (for paths that contain a +).")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Output folder; it appears only when complete (optional with --dry-run).")
@click.option("--max-ram", default=None, metavar="SIZE", help="RAM for the buffers, e.g. 1GiB (as for merge).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where the arithmetic runs (the changed weights are copies, computed where they are read).")
@click.option("--max-vram", default=None, metavar="SIZE", help="GPU memory for the merge's tensors (as for merge).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads to keep busy (as for merge; default: the CPUs this process may use).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Output dtype: bfloat16, float16 or float32 (default: each tensor keeps the model's dtype).")
@click.option("--shard-size", default=None, metavar="SIZE",
              help=f"Largest output shard (default {DEFAULT_SHARD_SIZE // 1000**3}GB).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None, hidden=True,
              help="Force the rows per chunk (testing).")
@click.option("--offline", is_flag=True, help="Resolve Hub IDs from the local Hugging Face cache only.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists and is not empty.")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's work instead of continuing it.")
@click.option("--redo-changed", is_flag=True,
              help="Continue an interrupted run whose inputs changed, redoing only what the change affects.")
@click.option("--allow-incomplete-output", is_flag=True,
              help="Write the weights even when the model has no config.json (transformers could not load them).")
@click.option("--dry-run", is_flag=True, help="Print the plan (what would change, memory, bytes) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (or with --dry-run the plan) as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def apply(model: Path, lora: Path | None, dry_run: bool, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Merge a PEFT LoRA adapter into its model and write the merged model to --out: PEFT's merge_and_unload,
    streamed in row chunks within --max-ram, for any model size (W + s·B@A per chunk; rsLoRA, rank_pattern and
    alpha_pattern, DoRA, lora_bias, modules_to_save and trainable tokens as PEFT applies them).

    \b
    Example:
      streammerge apply Qwen2-7B+my-adapter --out Qwen2-7B-merged --max-ram 2GiB
      streammerge apply Qwen2-7B --lora my+adapter --out merged
    """
    folder, adapter = split_reference(str(model))
    if lora is not None:
        if adapter is not None:
            raise click.UsageError(f"{model} names an adapter already ({adapter}); give it once")
        adapter = str(lora)
    if adapter is None:
        raise click.UsageError(f"no adapter: write MODEL+ADAPTER (e.g. {model}+my-adapter) or --lora ADAPTER")
    if kw["out"] is None and not dry_run:
        raise click.UsageError("Missing option '--out' (the folder to write the merged model to; --dry-run needs "
                               "none)")
    try:
        recipe = Recipe(base=Path(folder), models=(), adapters=(Path(adapter),), method="passthrough",
                        shard_size=kw.pop("shard_size") or DEFAULT_SHARD_SIZE, **kw)
        if dry_run:
            p = api.plan_recipe(recipe, dry_run=True)
            d = {**p.to_dict(), "destination": describe_destination(p)}
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if not dry_run:
        _run(recipe, as_json, quiet)
    elif as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        _print_plan_summary(d, sys.stdout)


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FOLDER [MODEL ...]")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--offline", is_flag=True, help="Resolve Hub IDs from the local Hugging Face cache only.")
def inspect(folders: tuple[Path, ...], as_json: bool, offline: bool) -> None:
    """Describe a model folder (or Hub ID): tensors, dtypes, shapes, shards, parameters, tying, vocabulary. Given a
    base and models (inspect BASE MODEL ...), say whether they can be merged: every difference from the base, with
    what streammerge does about it or the option that resolves it."""
    if len(folders) > 1:
        _compatibility(folders, as_json, offline)
        return
    try:
        info = api.inspect(folders[0], offline=offline)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    adapter = info.get("adapter")
    if "tensors" not in info:  # an adapter folder alone
        _echo_adapter(adapter)
        return
    arch = ", ".join(info["architectures"]) or info["model_type"] or "unknown architecture"
    click.echo(f"{info.get('hub_id') or info['folder']}: {arch}" + (f" ({info['folder']})" if info.get("hub_id") else ""))
    click.echo(f"  parameters  {info['parameters']:,} ({format_size(info['bytes'])})")
    click.echo("  dtypes      " + ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))
    click.echo(f"  vocab       {info['vocab_size']} (embedding rows {info['embedding_rows']})")
    tok = info["tokenizer"]
    if tok is not None:
        click.echo("  tokenizer   " + (tok["error"] if "error" in tok else
                                      f"{tok['tokens']} tokens, ids up to {tok['highest_id']}"
                                      + (f"; added: {', '.join(tok['added'][:8])}"
                                         + (f" and {len(tok['added']) - 8} more" if len(tok['added']) > 8 else "")
                                         if tok["added"] else "")))
    click.echo(f"  tied        {info['tied_embeddings']}")
    if info["quantization"]:
        click.echo(f"  quantized   {info['quantization']}")
    click.echo(f"  shards      {len(info['shards'])}: " + ", ".join(s["file"] for s in info["shards"]))
    click.echo(f"  tensors     {len(info['tensors'])}")
    for t in info["tensors"]:
        click.echo(f"    {t['name']:<60} {t['dtype']:<5} {t['shape']}")
    if adapter is not None:
        _echo_adapter(adapter)


def _echo_adapter(a: dict[str, Any]) -> None:
    click.echo(f"{a['folder']}: LoRA adapter, r {a['r']}, lora_alpha {a['lora_alpha']}"
               + (", DoRA" if a["use_dora"] else "") + (", rsLoRA" if a["use_rslora"] else "")
               + (f", for {a['base_model_name_or_path']}" if a["base_model_name_or_path"] else ""))
    click.echo(f"  tensors     {a['tensors']} ({format_size(a['bytes'])}) on {len(a['modules'])} modules")
    for m in a["modules"][:12]:
        click.echo(f"    {m}")
    if len(a["modules"]) > 12:
        click.echo(f"    ... and {len(a['modules']) - 12} more")


def _compatibility(folders: tuple[Path, ...], as_json: bool, offline: bool = False) -> None:
    from .compatibility import compare, to_dict, verdict
    from .formats.checkpoint import load_checkpoint
    from .hub import resolve

    try:
        base, *models = (load_checkpoint(resolve(f, offline).folder) for f in folders)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    differences = compare(base, models)
    if as_json:
        click.echo(json.dumps({"base": str(folders[0]), "models": [str(f) for f in folders[1:]],
                               **to_dict(differences)}, indent=2))
    else:
        click.echo(f"base {folders[0]} and {len(models)} model(s): {verdict(differences)}")
        for d in differences:
            click.echo(f"  [{d.status}] {d.who}: {d.what}\n      -> {d.action}")
    if any(d.status == "blocks" for d in differences):
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print the methods, and the plugins that were not loaded, as JSON.")
def methods(as_json: bool) -> None:
    """List merge methods with their origin (builtin, or the plugin's distribution and version), parameters and
    defaults. A plugin that cannot be loaded is named on stderr with why; the other methods work as usual."""
    found = all_methods()
    for problem in plugin_problems():
        click.echo(f"warning: {problem}", err=True)
    if as_json:
        click.echo(json.dumps({
            "methods": [{"name": m.name, "origin": method_origin(m.name), "summary": m.summary,
                         "reference": m.reference, "passes": m.passes, "min_models": m.min_models,
                         "max_models": m.max_models, "base_policy": m.base_policy,
                         "params": [{"name": p.name, "kind": p.kind.__name__, "default": p.default,
                                     "per_model": p.per_model, "help": p.help} for p in m.params]}
                        for m in found.values()],
            "plugin_problems": [p.to_dict() for p in plugin_problems()],
        }, indent=2))
        return
    for m in found.values():
        if m.max_models is None:
            count = f"{m.min_models} or more"
        elif m.max_models == m.min_models:
            count = f"exactly {m.min_models}"
        else:
            count = f"{m.min_models} to {m.max_models}"
        click.echo(f"{m.name}  (origin: {method_origin(m.name)}; models besides the base: {count}; passes: {m.passes})")
        click.echo(f"  {m.summary}")
        click.echo(f"  reference: {m.reference}")
        for p in m.params:
            per = ", per model" if p.per_model else ""
            click.echo(f"    {p.name} ({p.kind.__name__}{per}, default {p.default}): {p.help}")


def _shape_sizes() -> str:
    return ", ".join(f"{name} {format_size(3 * model_bytes(shape))}" for name, shape in SHAPES.items())


@main.command("make-example")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--shape", default="tiny", show_default=True, type=click.Choice(list(SHAPES)),
              help="Model dimensions. Size on disk of the three models in bfloat16 (float32 doubles it): "
                   + _shape_sizes() + ".")
@click.option("--dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32", "bf16", "fp16", "fp32"]),
              help="dtype the tensors are stored in.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the generated weights: the same seed gives the same bytes.")
@click.option("--force", is_flag=True, help="Write the example into FOLDER even if it holds something else: once "
                                            "the new example is complete, its base, chat and multilingual replace "
                                            "FOLDER's; other entries (e.g. FOLDER/merged) are kept.")
def make_example(folder: Path, shape: str, dtype: str, seed: int, force: bool) -> None:
    """Write a synthetic base model and two variants (chat-like and continual-pretrain-like) to merge, into
    FOLDER/base, FOLDER/chat and FOLDER/multilingual. Nothing appears until the example is complete; running it
    again with the same options leaves the example as it is."""
    try:
        paths, written = write_example(folder, shape, seed=seed, dtype=dtype, force=force)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if not written:
        click.echo(f"{folder} already holds this example", err=True)
    for name, path in paths.items():
        click.echo(f"{name:<13} {path}")


main.add_command(analyze_command)  # streammerge analyze: before merging, how the models changed


if __name__ == "__main__":
    from ._entry import main as entry

    entry()
