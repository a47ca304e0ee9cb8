"""The ``streammerge analyze`` command (registered on the main command group by :mod:`streammerge.cli`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..cli_types import ModelReference
from ..errors import StreamMergeError
from ..stopping import MergeInterrupted
from . import DEFAULT_TOP_K


@click.command("analyze")
@click.option("--base", "base", required=True, type=ModelReference(),
              help="Base model folder, or Hub ID org/name[@revision] from the Hugging Face cache.")
@click.option("--model", "models", multiple=True, required=True, type=ModelReference(),
              help="A model folder (or Hub ID) to compare with the base; repeat for each.")
@click.option("--top-k", "top_k", type=click.FloatRange(0, 100), default=DEFAULT_TOP_K, show_default=True,
              metavar="PERCENT",
              help="Report how much two models' top PERCENT largest changes (|Δ|, per tensor, exact) overlap; 0 "
                   "skips it (every tensor is then read once).")
@click.option("--max-ram", default=None, metavar="SIZE",
              help="RAM for the analysis's buffers, as for merge (default: half of the available RAM); sets the "
                   "chunk size, never a figure.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where the arithmetic runs, as for merge.")
@click.option("--max-vram", default=None, metavar="SIZE", help="GPU memory for the analysis's tensors, as for merge.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads to keep busy, as for merge (default: the CPUs this process may use).")
@click.option("--exclude", multiple=True, metavar="REGEX",
              help="Leave out tensors whose names match REGEX from the start (Python re.match); repeatable.")
@click.option("--embedding", "embeddings", multiple=True, metavar="NAME",
              help="Tensor names to treat as embeddings (one WIDEN column per stored row), as for merge.")
@click.option("--keep-vision", is_flag=True, help="Leave out a vision-language model's vision tower and projector.")
@click.option("--offline", is_flag=True, help="Resolve Hub IDs from the local Hugging Face cache only.")
@click.option("--tokenizer-source", default=None, metavar="base|union|FOLDER",
              help="Compare inputs that differ in vocabulary: their embedding and head rows mapped through their "
                   "tokenizers onto this vocabulary, as merge --tokenizer-source maps them.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=None, hidden=True,
              help="Force the rows per chunk (testing: the figures do not change).")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON on stdout (instead of the tables).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="FILE.png",
              help="Also draw the per-layer plot (relative change per model, cosine, sign conflict, top-k overlap) "
                   "into FILE.png (or .svg, .pdf); needs matplotlib: pip install 'streammerge[plot]'.")
@click.option("--tensors", "per_tensor", is_flag=True, help="Add a row per tensor to the tables.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or notes.")
def analyze_command(base: Path, models: tuple[Path, ...], top_k: float, max_ram: str | None, device: str,
                    max_vram: str | None, threads: int | None, exclude: tuple[str, ...], embeddings: tuple[str, ...], keep_vision: bool,
                    offline: bool, tokenizer_source: str | None, chunk_rows: int | None, as_json: bool,
                    plot: Path | None, per_tensor: bool, quiet: bool) -> None:
    """Before merging: how far each --model moved from --base, and how the models' changes relate.

    One streamed pass over every tensor (the merge's budget, reader and device; nothing is written but --plot).
    Per tensor, per layer, per module kind and for the whole model: each model's relative change ‖Δ‖/‖B‖, mean
    |Δ|, unchanged elements and WIDEN's per-column magnitude and direction divergences; for each pair of models
    the cosine of their deltas, the sign conflict and the top-k overlap. Then a verdict in words, citing the WIDEN
    paper (arXiv:2408.03092) for what it found about merging models that changed by different amounts.

    \b
    Example:
      streammerge analyze --base Qwen1.5-7B --model Qwen1.5-7B-Chat --model Sailor-7B --plot changes.png
    """
    from ..lora import split_inputs
    from ..recipe import Recipe, tokenizer_source_fields
    from .core import analyze_recipe

    show = not quiet and not as_json
    try:
        base, split_models, adapters = split_inputs(base, models)  # MODEL+ADAPTER references, as merge reads them
        recipe = Recipe(base=base, models=split_models, out=None, params={"top_k": top_k}, adapters=adapters,
                        max_ram=max_ram, device=device, threads=threads,
                        max_vram=max_vram, exclude=exclude, embedding_names=embeddings or None,
                        keep_vision=keep_vision, offline=offline, chunk_rows=chunk_rows,
                        **tokenizer_source_fields(tokenizer_source))
        result = analyze_recipe(recipe, progress=show, handle_signals=True, plot=plot,
                                notify=(lambda m: click.echo(f"note: {m}", err=True)) if show else None)
    except MergeInterrupted as exc:
        click.echo(f"Interrupted: analysis {exc} (nothing was written)", err=True)
        sys.exit(exc.exit_code)
    except StreamMergeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(result.report(tensors=per_tensor))
    if not quiet:
        click.echo(result.run.line(), err=True)
        if plot is not None:
            click.echo(f"plot written to {plot}", err=True)
