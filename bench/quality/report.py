"""The quality bench's Markdown report and plot."""

from __future__ import annotations

from pathlib import Path

LANGUAGE_NAMES = {"vi": "Vietnamese", "id": "Indonesian", "tr": "Turkish", "pl": "Polish", "cs": "Czech",
                  "ro": "Romanian", "hu": "Hungarian", "fi": "Finnish"}


def _cell(summary: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    """``mean (min–max)`` of one score over the seeds."""
    if key not in summary:
        return "-"
    v = summary[key]
    if v["min"] == v["max"]:
        return f"{v['mean'] * scale:.{digits}f}"
    return f"{v['mean'] * scale:.{digits}f} ({v['min'] * scale:.{digits}f}–{v['max'] * scale:.{digits}f})"


def _params(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.get("params", {}).items()) or "defaults"


def markdown(result: dict) -> str:
    """The report: setup, the measured weight changes, one row per model with the scores over the seeds."""
    lang = result["corpus"]["language"]
    lname = LANGUAGE_NAMES.get(lang, lang)
    sec = result["seconds"]
    model = result["settings"]["model"]
    lines = [
        f"# Merge quality, FT + PT ({result['mode']} mode), {result['started_utc']}",
        "",
        f"A tiny byte-level Qwen2 ({result['base']['params']:,} parameters: hidden {model['hidden']}, "
        f"{model['layers']} layers, context {model['context']}) trained from scratch on English; an FT variant "
        f"(synthetic instruction tasks) and a PT variant (continued pre-training on {lname} gettext msgstrs) per "
        f"seed; every method of `streammerge methods` through `streammerge merge` ({result['streammerge']}). "
        f"{result['seeds']} seed(s): a seed changes the FT and PT training (data order, initial RNG) and the "
        "merge's `--seed`; the base is shared. Cells: mean over the seeds (min–max).",
        "",
        f"FT variant: {_ft_training(result)}. PT variant: `--pt-style "
        f"{result['settings'].get('pt_style', 'full')}`, {result['settings']['pt_steps']} steps, lr "
        f"{result['settings']['pt_lr']:g}."
        + (f" Base: not trained here, `--base-from {result['base']['from']}`." if result["base"].get("from") else ""),
        "",
        f"Time: {sec['total']:.0f} s in all (corpus {sec['corpus']:.0f} s, base {sec['base']:.0f} s, FT "
        f"{sec['ft']:.0f} s, PT {sec['pt']:.0f} s, analyze {sec['analyze']:.0f} s, merges {sec['merge']:.0f} s, "
        f"scoring {sec['score']:.0f} s); {result['machine']['cpus']} CPUs, load average "
        f"{result['machine']['loadavg_start'][0]:.2f} at the start, {result['machine']['loadavg_end'][0]:.2f} at "
        f"the end, nice {result['machine']['nice']}.",
    ]
    if result["corpus"].get("language_note"):
        lines += ["", f"Language: {result['corpus']['language_note']}."]
    lines += ["", "## How far each variant moved (‖Δ‖/‖B‖, whole model)", "",
              "| seed | FT | PT | PT / FT | cosine(ΔFT, ΔPT) | sign conflict | from |",
              "|---|---|---|---|---|---|---|"]
    for seed, c in result["relative_change"].items():
        cos = f"{c['cosine']:.3f}" if c.get("cosine") is not None else "-"
        conflict = f"{c['sign_conflict']:.1%}" if c.get("sign_conflict") is not None else "-"
        lines.append(f"| {seed} | {c['ft']:.2%} | {c['pt']:.2%} | {c['pt_over_ft']:.1f}x | {cos} | {conflict} | "
                     f"{c['source']} |")
    pre = _has_pre(result)  # --ft-style format: also the tasks in the base's own prompt format
    lines += ["", "## Scores", "",
              f"| model | inputs | parameters | FT exact match % ↑ | FT answer bits/token ↓ | {lname} bits/byte ↓ "
              "| English bits/byte ↓ |" + (" base-format exact match % ↑ | base-format answer bits/token ↓ |"
                                         if pre else ""),
              "|---|---|---|---|---|---|---|" + ("---|---|" if pre else "")]
    for r in result["rows"]:
        sm = r["summary"]
        errors = [v["error"] for v in r["per_seed"].values() if "error" in v]
        if not sm["seeds_ok"]:
            first = errors[0].splitlines()
            why = (first[1] if len(first) > 1 else first[0]).strip().replace("|", "\\|")[:160]
            lines.append(f"| {r['label']} | {r['call']} | {_params(r)} | failed: {why} | | | |"
                         + (" | |" if pre else ""))
            continue
        name = f"**{r['label']}**" if r["kind"] == "source" else r["label"]
        note = f" ({len(errors)} seed(s) failed)" if errors else ""
        lines.append(f"| {name}{note} | {r['call']} | {_params(r) if r['kind'] == 'merge' else '-'} | "
                     f"{_cell(sm, 'ft_exact_match', 100, 1)} | {_cell(sm, 'ft_answer_bits')} | "
                     f"{_cell(sm, 'new_bpb')} | {_cell(sm, 'en_bpb')} |"
                     + (f" {_cell(sm, 'pre_exact_match', 100, 1)} | {_cell(sm, 'pre_answer_bits')} |" if pre else ""))
    lines += ["", "Per task exact match % of the source models (mean over the seeds):", "",
              "| model | " + " | ".join(_tasks(result)) + " |", "|---|" + "---|" * len(_tasks(result))]
    for r in result["rows"]:
        if r["kind"] == "source":
            per = [v["ft_per_task"] for v in r["per_seed"].values() if "ft_per_task" in v]
            lines.append(f"| {r['label']} | " + " | ".join(
                f"{100 * sum(p[t] for p in per) / len(per):.1f}" for t in _tasks(result)) + " |")
    if pre:
        lines += ["", "The same in the base's own prompt format (`Q: reverse abc\\nA: `, which the base was "
                  "pre-trained on):", "", "| model | " + " | ".join(_tasks(result)) + " |",
                  "|---|" + "---|" * len(_tasks(result))]
        for r in result["rows"]:
            if r["kind"] == "source":
                per = [v["pre_per_task"] for v in r["per_seed"].values() if "pre_per_task" in v]
                lines.append(f"| {r['label']} | " + " | ".join(
                    f"{100 * sum(p[t] for p in per) / len(per):.1f}" for t in _tasks(result)) + " |")
    ev = result["eval"]
    lines += [
        "",
        f"FT exact match: {ev['ft_examples']} held-out prompts (four tasks in turn), greedy decoding must give the "
        "answer then `</s>` (decided exactly by one teacher-forced pass). FT answer bits/token: cross-entropy of the "
        f"answer bytes and `</s>`. Bits per byte: {ev['windows']} held-out windows of {ev['window_bytes']} bytes "
        f"({lname} msgstrs; English documentation and msgids), every byte scored. "
        "`inputs` \"FT + PT (FT as --base)\": methods that take exactly one model besides the base, run as "
        "`--base FT --model PT`.",
    ]
    if pre:
        lines += ["", "Base-format columns (`--ft-style format`): the same held-out prompts rewritten as `Q: <task> "
                  "<word>\\nA: `, the format the base saw in pre-training (its task rows); the FT columns use the "
                  "evaluation format `<task>: <word> =>`, which only the FT variant was trained on."]
    if "plot" in result:
        lines += ["", f"![FT exact match against {lname} bits per byte]({result['plot']})"]
    return "\n".join(lines) + "\n"


def _ft_training(result: dict, short: bool = False) -> str:
    """How the FT variant trained (``--ft-style``; results from before the option were all ``adam``)."""
    st = result["settings"]
    optimizer = {"adamw": "AdamW", "sgd": "SGD (momentum 0.9)"}.get(st.get("ft_optimizer", "adamw"))
    text = f"`--ft-style {st.get('ft_style', 'adam')}`, {optimizer}, lr {st['ft_lr']:g}, {st['ft_steps']} steps"
    if st.get("base_task_rows") and not short:
        formats = st.get("base_task_formats", 1)
        text += (f"; each batch {st['ft_rows']} rows of FT-format examples, {st.get('ft_replay_rows', 0)} rows in the "
                 f"base's format(s), {st['ft_text_rows']} of English. The base was pre-trained with "
                 f"{st['base_task_rows']} of its {st['batch']} rows of task examples in its own "
                 + ("format (`Q: <task> <word>\\nA: `)" if formats == 1 else
                    f"{formats} formats (the first `Q: <task> <word>\\nA: `; `corpus.PRETRAIN_PROMPTS`)"))
    return text


def _has_pre(result: dict) -> bool:
    return any("pre_exact_match" in v for r in result["rows"] for v in r["per_seed"].values())


def _tasks(result: dict) -> list[str]:
    for r in result["rows"]:
        for v in r["per_seed"].values():
            if "ft_per_task" in v:
                return list(v["ft_per_task"])
    return []


def _panel(ax, result: dict, xkey: str, ykey: str, styles: dict) -> None:
    """One scatter: a point per model (mean over the seeds, bars from the smallest to the largest seed's value);
    merges with the same (rounded) position share one label."""
    scale = 100.0 if xkey == "ft_exact_match" else 1.0
    seen: set[str] = set()
    names: dict[tuple[float, float], list[str]] = {}
    xs_all: list[float] = []
    for r in result["rows"]:
        sm = r["summary"]
        if not sm["seeds_ok"]:
            continue
        x, y = sm[xkey], sm[ykey]
        xs = [scale * x["mean"], scale * (x["mean"] - x["min"]), scale * (x["max"] - x["mean"])]
        ys = [y["mean"], y["mean"] - y["min"], y["max"] - y["mean"]]
        xs_all += [scale * x["min"], scale * x["max"]]
        if r["kind"] == "source":
            st = dict(styles[r["label"]])
            label = st.pop("label")
        elif r["method"] == "widen":
            st, label = dict(marker="*", color="tab:green", ms=14), "WIDEN merge"
        else:
            st, label = dict(marker="o", color="tab:gray", ms=6), "other merge methods"
        ax.errorbar(xs[0], ys[0], xerr=[[xs[1]], [xs[2]]], yerr=[[ys[1]], [ys[2]]], ls="none", capsize=2,
                    elinewidth=0.8, label=None if label in seen else label, zorder=3, **st)
        seen.add(label)
        if r["kind"] == "merge":
            names.setdefault((round(xs[0], 1 if scale > 1 else 2), round(ys[0], 2)), []).append(r["label"])
    for i, ((x0, y0), labels) in enumerate(sorted(names.items(), key=lambda kv: kv[0][1])):
        ax.annotate(" = ".join(labels), (x0, y0), xytext=(5, 3 if i % 2 else -8), textcoords="offset points",
                    fontsize=6.5, color="dimgray")
    if xkey == "ft_exact_match":
        ax.set_xlim(-2, min(102, max(10, max(xs_all) * 1.15 + 5)))
        ax.set_xlabel("FT ability: exact match on held-out task prompts (%), higher is better")
    else:
        ax.invert_xaxis()  # right is better in every panel
        ax.set_xlabel("FT ability: cross-entropy of the held-out answers (bits/token, lower is better; "
                      "axis reversed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot(result: dict, path: Path) -> None:
    """Top row (the figure the issue asks for): FT exact match against the new language's bits per byte, and
    against English bits per byte. Bottom row: the same with the FT answers' cross-entropy on x, which still
    separates methods where exact match is 0 for all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lang = LANGUAGE_NAMES.get(result["corpus"]["language"], result["corpus"]["language"])
    fig, axes = plt.subplots(2, 2, figsize=(16, 13))
    styles = {"base": dict(marker="s", color="black", ms=10, label="base (English only)"),
              "FT": dict(marker="^", color="tab:blue", ms=11, label="FT variant (instruction tasks)"),
              "PT": dict(marker="D", color="tab:red", ms=10, label=f"PT variant ({lang} continued pre-training)")}
    ylabels = {"new_bpb": f"PT ability: {lang} bits per byte, held out (lower is better)",
               "en_bpb": "what the base knew: English bits per byte, held out (lower is better)"}
    for row, xkey in enumerate(("ft_exact_match", "ft_answer_bits")):
        for col, ykey in enumerate(("new_bpb", "en_bpb")):
            _panel(axes[row][col], result, xkey, ykey, styles)
            axes[row][col].set_ylabel(ylabels[ykey])
    n = result["seeds"]
    fig.suptitle(f"Merging an FT and a PT variant of a {result['base']['params'] / 1e6:.1f}M-parameter byte-level "
                 f"Qwen2 ({result['mode']} mode; FT: {_ft_training(result, short=True).replace('`', '')}"
                 + (f"; PT: --pt-style {pt}" if (pt := result["settings"].get("pt_style", "full")) != "full" else "")
                 + "): "
                 f"mean of {n} seed(s), "
                 "bars span min–max", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/quality/report.py RESULTS.json   (redraws RESULTS.png from the JSON)")
    source = Path(sys.argv[1])
    plot(json.loads(source.read_text()), source.with_suffix(".png"))
    print(source.with_suffix(".png"))
