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
from .errors import StreamMergeError
from .examples import SHAPES, model_bytes, write_example
from .execute import execute
from .manifest import MANIFEST
from .methods import all_methods, method_origin, plugin_problems
from .output import work_folder_for
from .planner import VARIES
from .progress import RunSummary
from .recipe import DEFAULT_SHARD_SIZE, Recipe
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
        click.option("--base", "base", type=click.Path(path_type=Path),
                     help="Base model folder, or Hub ID org/name[@revision] from the Hugging Face cache (the common "
                          "ancestor the others were trained from); required without a recipe."),
        click.option("--model", "models", multiple=True, type=click.Path(path_type=Path),
                     help="A model folder (or Hub ID) to merge; repeat for each (order matters for per-model "
                          "parameters); required without a recipe."),
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
                     help="Seed for methods that draw random masks (dare_linear, dare_ties); default 0."),
        click.option("--tokenizer-from", type=click.Path(path_type=Path), default=None,
                     help="Copy tokenizer files from this folder instead of the base."),
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
_RECIPE_DECIDES = {"base": "--base", "models": "--model", "method": "--method", "params": "--param", "seed": "--seed",
                   "dtype": "--dtype", "exclude": "--exclude", "embeddings": "--embedding",
                   "keep_vision": "--keep-vision", "tokenizer_from": "--tokenizer-from", "shard_size": "--shard-size"}
_HOW_IT_RUNS = ("out", "max_ram", "device", "max_vram", "chunk_rows", "force", "restart", "redo_changed",
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
    params = _parse_params(kw["params"])
    if kw["seed"] is not None:
        if "seed" in params:
            raise click.UsageError("give the seed once: --seed N or --param seed=N")
        params["seed"] = str(kw["seed"])
    return Recipe(
        base=kw["base"], models=kw["models"], out=kw["out"], method=kw["method"] or "widen",
        params=params, dtype=kw["dtype"], exclude=kw["exclude"],
        embedding_names=kw["embeddings"] or None, tokenizer_from=kw["tokenizer_from"],
        shard_size=kw["shard_size"] or DEFAULT_SHARD_SIZE,
        max_ram=kw["max_ram"], device=kw["device"], max_vram=kw["max_vram"], chunk_rows=kw["chunk_rows"], force=kw["force"], restart=kw["restart"],
        redo_changed=kw["redo_changed"], allow_incomplete_output=kw["allow_incomplete_output"],
        keep_vision=kw["keep_vision"], offline=kw["offline"],
        journal=not kw["no_journal"],
    )


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


def _print_plan_summary(d: dict[str, Any], stream: Any) -> None:
    lines = [
        f"method      {d['method']} ({', '.join(f'{k}={v}' for k, v in d['params'].items()) or 'no parameters'})"
        + ("; --json lists each tensor's" if VARIES in d["params"].values() else ""),
        f"base        {d['base']}",
        *(f"model {i + 1:<5} {m}" for i, m in enumerate(d["models"])),
        f"output      {d['out'] or '(no --out)'} ({len(d['shards'])} shard(s), {format_size(d['bytes_written'])})",
        *([f"destination {d['destination']}"] if d.get("destination") else []),
        f"device      {d['device']}" + (f" ({d['device_source']})" if d.get("device_source") else ""),
        f"budget      {format_size(d['budget']['max_ram'])} ({d['budget']['source']})",
        f"peak RAM    {format_size(d['predicted_peak_ram'])} predicted for buffers (plus the interpreter)",
        *([f"GPU memory  {format_size(d['budget']['max_vram'])} ({d['budget']['vram_source']}); "
           f"{format_size(d['predicted_peak_vram'])} predicted for tensors"] if d.get("predicted_peak_vram") else []),
        ("reads once  every tensor: no statistics passes" if not d["read_once"] + d["read_per_pass"] else
         f"reads once  {d['read_once']} tensor(s) with statistics passes are read once (they fit the budget whole); "
         f"{d['read_per_pass']} are read again for each pass"),
        _chunking_line(d["tensors"]),
        f"reads       {format_size(d['bytes_read'])}",
        "tensors     " + ", ".join(f"{n} {rule}" for rule, n in sorted(d["rules"].items())),
        *(f"{'copied' if why == 'passthrough' else 'base value':<11} {len(names)} ({why}): {_some(names)}"
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
    """


@main.command()
@_merge_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge(as_json: bool, quiet: bool, **kw: Any) -> None:
    """Merge --model folders onto --base with --method, writing --out; or run a recipe (mergekit's YAML schema:
    merge_method, base_model, models with parameters, gradients and filters).

    \b
    Example (WIDEN, the paper's settings, 4 GiB of RAM):
      streammerge merge --base Qwen1.5-7B --model Qwen1.5-7B-Chat --model Sailor-7B \\
          --method widen --param t=1.0 --param s=1.0 --max-ram 4GiB --out merged
    A mergekit recipe, unchanged:
      streammerge merge recipe.yaml --out merged --max-ram 4GiB
    Every output holds streammerge_recipe.yaml, which reruns its merge.
    """
    try:
        recipe = _recipe(kw)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    _run(recipe, as_json, quiet)


def _run(recipe: Recipe, as_json: bool, quiet: bool) -> None:
    """Plan and execute; interruptions exit 130/143 with how to resume. Ends with the run's summary line (stderr)
    and where the model is (stdout), or one JSON object."""
    summaries: list[RunSummary] = []
    try:
        plan = api.plan_recipe(recipe)
        d = plan.to_dict()
        if not quiet and not as_json:
            _print_plan_summary(d, sys.stderr)
        out = execute(plan, show_progress=not quiet and not as_json, handle_signals=True,
                      notify=lambda message: click.echo(f"note: {message}", err=True), report=summaries.append)
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
@click.option("--redo-changed", is_flag=True,
              help="The inputs changed since the run was interrupted: keep the work of the tensors the change does "
                   "not affect and redo the others.")
@click.option("--restart", is_flag=True,
              help="Discard the interrupted run's work and merge again from the start, with the same options.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def resume(out: Path, max_ram: str | None, max_vram: str | None, redo_changed: bool, restart: bool, as_json: bool,
           quiet: bool) -> None:
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
        stored = json.loads(plan_file.read_text(encoding="utf-8"))["recipe"]
        recipe = Recipe.from_json(stored, max_ram=max_ram, max_vram=max_vram, redo_changed=redo_changed or None,
                                  restart=restart or None)
    except (ValueError, KeyError, TypeError) as exc:
        raise click.ClickException(f"{plan_file} is damaged ({exc}); start over with the original merge command "
                                   "and --restart") from None
    _run(recipe, as_json, quiet)


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


@main.command("plan")
@(lambda f: _merge_options(f, out_required=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan (every tensor) as JSON.")
def plan_cmd(as_json: bool, **kw: Any) -> None:
    """Show what a merge would do (shards, chunking, memory, bytes, and what it would do with --out) without
    reading tensor data or writing anything."""
    try:
        p = api.plan_recipe(_recipe(kw), dry_run=True)
        d = {**p.to_dict(), "destination": describe_destination(p)}
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        _print_plan_summary(d, sys.stdout)


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FOLDER [MODEL ...]")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def inspect(folders: tuple[Path, ...], as_json: bool) -> None:
    """Describe a model folder: tensors, dtypes, shapes, shards, parameters, tying, vocabulary. Given a base and
    models (inspect BASE MODEL ...), say whether they can be merged: every difference from the base, with what
    streammerge does about it or the option that resolves it."""
    if len(folders) > 1:
        _compatibility(folders, as_json)
        return
    try:
        info = api.inspect(folders[0])
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    arch = ", ".join(info["architectures"]) or info["model_type"] or "unknown architecture"
    click.echo(f"{info['folder']}: {arch}")
    click.echo(f"  parameters  {info['parameters']:,} ({format_size(info['bytes'])})")
    click.echo("  dtypes      " + ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()))
    click.echo(f"  vocab       {info['vocab_size']} (embedding rows {info['embedding_rows']})")
    click.echo(f"  tied        {info['tied_embeddings']}")
    if info["quantization"]:
        click.echo(f"  quantized   {info['quantization']}")
    click.echo(f"  shards      {len(info['shards'])}: " + ", ".join(s["file"] for s in info["shards"]))
    click.echo(f"  tensors     {len(info['tensors'])}")
    for t in info["tensors"]:
        click.echo(f"    {t['name']:<60} {t['dtype']:<5} {t['shape']}")


def _compatibility(folders: tuple[Path, ...], as_json: bool) -> None:
    from .compatibility import compare, to_dict, verdict
    from .formats.checkpoint import load_checkpoint

    try:
        base, *models = (load_checkpoint(f) for f in folders)
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


if __name__ == "__main__":
    from ._entry import main as entry

    entry()
