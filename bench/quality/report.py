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
    lines += ["", "## How far each variant moved (whole model)", "",
              "‖Δ‖/‖B‖ is relative to the base's weights; mean |Δ| is per parameter, in weight units, the unit of the "
              "WIDEN paper's figures (FT about 0.0005–0.002, PT about 0.005).", "",
              "| seed | FT ‖Δ‖/‖B‖ | PT ‖Δ‖/‖B‖ | PT / FT | FT mean \\|Δ\\| | PT mean \\|Δ\\| | cosine(ΔFT, ΔPT) "
              "| sign conflict | from |",
              "|---|---|---|---|---|---|---|---|---|"]
    for seed, c in result["relative_change"].items():
        cos = f"{c['cosine']:.3f}" if c.get("cosine") is not None else "-"
        conflict = f"{c['sign_conflict']:.1%}" if c.get("sign_conflict") is not None else "-"
        mean_abs = [f"{c[k]:.2g}" if c.get(k) is not None else "-" for k in ("ft_mean_abs", "pt_mean_abs")]
        lines.append(f"| {seed} | {c['ft']:.2%} | {c['pt']:.2%} | {c['pt_over_ft']:.1f}x | {mean_abs[0]} | "
                     f"{mean_abs[1]} | {cos} | {conflict} | {c['source']} |")
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


# ----------------------------------------------------------------------------------------------- the plot
#: always named on the plot (besides the best few merges): the paper's method and its two usual baselines
KEY_METHODS = {"widen": "WIDEN", "task_arithmetic": "task_arithmetic", "ties": "TIES"}
#: the scores a merge's point depends on, and the precision the Markdown table shows them at (merges whose scores
#: agree at that precision share one number on the plot)
PLOTTED = {"ft_exact_match": (100.0, 1), "ft_answer_bits": (1.0, 3), "new_bpb": (1.0, 3), "en_bpb": (1.0, 3)}


def _source(result: dict, label: str) -> dict | None:
    for r in result["rows"]:
        if r["kind"] == "source" and r["label"] == label and r["summary"]["seeds_ok"]:
            return r["summary"]
    return None


def _retention(result: dict):
    """``(kept, measure)``: ``kept(summary)`` is a merge's (FT kept, PT kept), the share of the FT variant's change
    from the base in FT ability and of the PT variant's in the new language's bits per byte (0 = the base's score,
    1 = the variant's). FT ability is exact match where it separates the merges (the FT variant gains at least 10
    points over the base, and a quarter of the merges keep at least 5% of that), else the answers' cross-entropy
    (exact match 0 for nearly every merge ranks nothing). ``(None, "")`` without all three source models."""
    base, ft, pt = (_source(result, k) for k in ("base", "FT", "PT"))
    if not (base and ft and pt):
        return None, ""

    def share(sm: dict, key: str, variant: dict) -> float:
        lo, hi = base[key]["mean"], variant[key]["mean"]
        return (sm[key]["mean"] - lo) / (hi - lo) if hi != lo else float("nan")

    merges = [r["summary"] for r in result["rows"] if r["kind"] == "merge" and r["summary"]["seeds_ok"]]
    separates = ft["ft_exact_match"]["mean"] - base["ft_exact_match"]["mean"] >= 0.1 and \
        sum(share(sm, "ft_exact_match", ft) >= 0.05 for sm in merges) >= max(2, len(merges) / 4)
    ftkey, measure = ("ft_exact_match", "exact match") if separates else ("ft_answer_bits", "answer cross-entropy")
    return (lambda sm: (share(sm, ftkey, ft), share(sm, "new_bpb", pt))), measure


def _groups(result: dict) -> list[dict]:
    """The merges that have a score, those with the same scores (at the table's precision) as one group, ranked
    by the smaller of (FT kept, PT kept), best first (ties: by their mean); each with its number on the plot (the
    rank), the name shown beside it (``None``: the number only) and whether it is WIDEN. Named: WIDEN,
    task_arithmetic and TIES (at their defaults), the best three at keeping both, the best at keeping each."""
    kept, _ = _retention(result)
    by_scores: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        if r["kind"] == "merge" and r["summary"]["seeds_ok"]:
            sm = r["summary"]
            key = tuple(round(sm[k]["mean"] * scale, digits) for k, (scale, digits) in PLOTTED.items())
            by_scores.setdefault(key, []).append(r)
    groups = []
    for rows in by_scores.values():
        ftk, ptk = kept(rows[0]["summary"]) if kept else (float("nan"), float("nan"))
        both, mean = min(ftk, ptk), (ftk + ptk) / 2
        groups.append({"rows": rows, "labels": [r["label"] for r in rows], "ft_kept": ftk, "pt_kept": ptk,
                       "both": both if both == both else float("-inf"), "mean": mean if mean == mean else 0.0,
                       "widen": any(r["method"] == "widen" and not r.get("params") for r in rows)})
    groups.sort(key=lambda g: (-g["both"], -g["mean"], g["labels"][0]))
    for i, g in enumerate(groups):
        g["number"] = i + 1
    named = {id(g) for g in groups[:3]}  # the best three at keeping both
    if kept:
        named |= {id(max(groups, key=lambda g: (g[k] if g[k] == g[k] else float("-inf")))) for k in
                  ("ft_kept", "pt_kept") if groups}
    for g in groups:
        key = [KEY_METHODS[r["method"]] for r in g["rows"] if r["method"] in KEY_METHODS and not r.get("params")]
        if key or id(g) in named:
            first = key[0] if key else g["labels"][0]
            g["name"] = first + (f" (+{len(g['labels']) - 1})" if len(g["labels"]) > 1 else "")
        else:
            g["name"] = None
    return groups


class _Labeller:
    """Greedy label placement in one axes, without a dependency: each label goes to the first of a ring of candidate
    positions around its point (nearest first) whose box overlaps no marker, error bar, earlier label or leader line
    and stays inside the axes; labels set off from their point get a thin leader line."""

    RADII = (1, 3, 6, 10, 15, 21, 28, 36, 46, 58, 72, 88, 106, 128, 155, 185, 220)  # points from the point's edge
    ANGLES = (0, 45, -45, 90, -90, 180, 135, -135, 22.5, -22.5, 67.5, -67.5, 112.5, -112.5, 157.5, -157.5)

    def __init__(self, ax, renderer) -> None:
        import numpy as np

        self.np, self.ax, self.renderer = np, ax, renderer
        self.px = ax.figure.dpi / 72.0  # pixels per point
        box = ax.get_window_extent(renderer)
        self.frame = (box.x0 + 2, box.y0 + 2, box.x1 - 2, box.y1 - 2)
        self.obstacles: list[tuple[float, float, float, float]] = []
        self.labels: list[tuple[float, float, float, float]] = []
        self.points: list[tuple[float, float, float]] = []  # the markers' centres and radii
        self.soft: list[tuple[float, float, float, float]] = []  # lines a label may cross if nothing near is free

    def block_point(self, x: float, y: float, size_pt: float) -> None:
        px, py = self.ax.transData.transform((x, y))
        r = size_pt * self.px / 2 + 1
        self.points.append((px, py, r))
        self.obstacles.append((px - r, py - r, px + r, py + r))

    def block_segment(self, a: tuple[float, float], b: tuple[float, float], width_px: float = 2.0) -> None:
        (ax_, ay), (bx, by) = self.ax.transData.transform([a, b])
        self.obstacles.append((min(ax_, bx) - width_px, min(ay, by) - width_px, max(ax_, bx) + width_px,
                               max(ay, by) + width_px))

    def place(self, x: float, y: float, text: str, marker_pt: float, **kw) -> None:
        np = self.np
        probe = self.ax.text(0, 0, text, **kw)
        ext = probe.get_window_extent(self.renderer)
        probe.remove()
        w, h = ext.width + 2, ext.height + 1
        px, py = self.ax.transData.transform((x, y))
        gap = marker_pt * self.px / 2
        ang = np.radians(np.array(self.ANGLES))
        r = (np.array(self.RADII)[:, None] * self.px + gap)
        c, s = np.cos(ang)[None, :], np.sin(ang)[None, :]
        cx = (px + c * (r + w / 2)).ravel()
        cy = (py + s * (r + h / 2)).ravel()
        radius = (r * np.ones_like(s)).ravel()
        # above and below a point, a label may also start or end at the point (where centring hits an edge)
        steep = (np.abs(s) * np.ones_like(r)).ravel() > 0.7
        shift = max(w / 2 - 4, 0)
        cx = np.concatenate([cx, cx[steep] + shift, cx[steep] - shift])
        cy = np.concatenate([cy, cy[steep], cy[steep]])
        radius = np.concatenate([radius, radius[steep], radius[steep]])
        order = np.argsort(radius, kind="stable")  # nearest first, then in ANGLES' order
        cx, cy, radius = cx[order], cy[order], radius[order]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        cost = np.zeros(len(cx))
        if self.obstacles or self.labels:
            obs = np.array(self.obstacles + self.labels)
            ox = np.clip(np.minimum(boxes[:, None, 2], obs[None, :, 2]) - np.maximum(boxes[:, None, 0],
                                                                                     obs[None, :, 0]), 0, None)
            oy = np.clip(np.minimum(boxes[:, None, 3], obs[None, :, 3]) - np.maximum(boxes[:, None, 1],
                                                                                     obs[None, :, 1]), 0, None)
            cost += (ox * oy).sum(axis=1)
        fx0, fy0, fx1, fy1 = self.frame
        outside = (np.clip(fx0 - boxes[:, 0], 0, None) + np.clip(boxes[:, 2] - fx1, 0, None)
                   + np.clip(fy0 - boxes[:, 1], 0, None) + np.clip(boxes[:, 3] - fy1, 0, None))
        cost += 1000.0 * outside
        if self.soft:
            soft = np.array(self.soft)
            ox = np.clip(np.minimum(boxes[:, None, 2], soft[None, :, 2]) - np.maximum(boxes[:, None, 0],
                                                                                      soft[None, :, 0]), 0, None)
            oy = np.clip(np.minimum(boxes[:, None, 3], soft[None, :, 3]) - np.maximum(boxes[:, None, 1],
                                                                                      soft[None, :, 1]), 0, None)
            cost += 0.002 * (ox * oy).sum(axis=1) + 0.03 * (radius - gap)  # then: near, crossing a line, beats far
        if self.labels:  # a leader line must not cross an earlier label
            lab = np.array(self.labels)
            t = np.linspace(0.15, 0.85, 8)[None, :]
            sx, sy = px + (cx[:, None] - px) * t, py + (cy[:, None] - py) * t
            inside = ((sx[:, :, None] > lab[None, None, :, 0]) & (sx[:, :, None] < lab[None, None, :, 2])
                      & (sy[:, :, None] > lab[None, None, :, 1]) & (sy[:, :, None] < lab[None, None, :, 3]))
            cost += 50.0 * inside.sum(axis=(1, 2))
        if self.obstacles:  # nor run through another point's marker, error bar or an earlier leader line
            obs = np.array(self.obstacles)
            own = (obs[:, 0] <= px) & (obs[:, 2] >= px) & (obs[:, 1] <= py) & (obs[:, 3] >= py)
            obs = obs[~own]
            t = np.linspace(0.1, 0.9, 9)[None, :]
            sx, sy = px + (cx[:, None] - px) * t, py + (cy[:, None] - py) * t
            inside = ((sx[:, :, None] > obs[None, None, :, 0]) & (sx[:, :, None] < obs[None, None, :, 2])
                      & (sy[:, :, None] > obs[None, None, :, 1]) & (sy[:, :, None] < obs[None, None, :, 3]))
            cost += 20.0 * inside.any(axis=2).sum(axis=1) * (radius > gap + 8 * self.px)
        if self.points:  # a label without a leader must sit nearer its own marker than any other (edge to edge)
            pts = np.array(self.points)
            pts = pts[np.hypot(pts[:, 0] - px, pts[:, 1] - py) > 2]
            if len(pts):
                def gap_to(qx, qy):
                    return np.hypot(np.clip(np.maximum(boxes[:, 0, None] - qx, qx - boxes[:, 2, None]), 0, None),
                                    np.clip(np.maximum(boxes[:, 1, None] - qy, qy - boxes[:, 3, None]), 0, None))
                own = gap_to(np.array([px]), np.array([py]))[:, 0] - gap
                other = (gap_to(pts[:, 0], pts[:, 1]) - pts[None, :, 2]).min(axis=1)
                cost += 30.0 * ((other < own + 6 * self.px) & (radius <= gap + 8 * self.px))
        best = int(np.argmin(cost + 1e-6 * np.arange(len(cost))))  # ties: the nearest, in ANGLES' order
        bx, by = cx[best], cy[best]
        offset = ((bx - px) / self.px, (by - py) / self.px)
        leader = radius[best] > gap + 8 * self.px
        self.ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha="center", va="center",
                         zorder=6, annotation_clip=False,
                         arrowprops=dict(arrowstyle="-", lw=0.6, color="0.45", shrinkA=0,
                                         shrinkB=gap / self.px + 0.5) if leader else None, **kw)
        self.labels.append(tuple(boxes[best]))
        if leader:  # later labels keep off the line: small boxes along it
            for t in np.linspace(0.1, 0.9, 9):
                lx, ly = px + (bx - px) * t, py + (by - py) * t
                self.obstacles.append((lx - 1.5, ly - 1.5, lx + 1.5, ly + 1.5))


def _descriptions(result: dict) -> dict[str, str]:
    """What each source model was trained on, from the run's settings (``--ft-style``, ``--pt-style``): the base on
    English text, with ``--ft-style format`` also on the tasks in its own prompt formats (``base_task_rows``)."""
    st = result["settings"]
    lang = LANGUAGE_NAMES.get(result["corpus"]["language"], result["corpus"]["language"])
    tasks = f"the {len(_tasks(result))} tasks" if _tasks(result) else "the tasks"
    base = "English text" + (f" + {tasks} in {st.get('base_task_formats', 1)} other prompt format(s)"
                             if st.get("base_task_rows") else " only")
    if result["base"].get("from"):
        base += "; trained by an earlier run"
    ft = f"{tasks} in the evaluation's prompt format" + (
        " + English text" if st.get("ft_text_rows") else "") + (
        " + the base's formats" if st.get("ft_replay_rows") else "")
    pt = f"continued pre-training on {lang}, {st['pt_steps']} steps"
    return {"base": f"base ({base})", "FT": f"FT variant ({ft})", "PT": f"PT variant ({pt})"}


def _titles(result: dict, width: int) -> tuple[str, str]:
    import textwrap

    st = result["settings"]
    n = result["seeds"]
    title = (f"Does a merge keep both abilities? FT + PT merges of a {result['base']['params'] / 1e6:.1f}M-parameter "
             f"byte-level Qwen2, mean of {n} seed{'s' if n != 1 else ''}" + (" (bars: min–max)" if n > 1 else ""))
    parts = [f"{result['mode']} mode", f"FT: {_ft_training(result, short=True).replace('`', '')}",
             f"PT: --pt-style {st.get('pt_style', 'full')}, {st['pt_steps']} steps, lr {st['pt_lr']:g}",
             result["streammerge"].replace("streammerge, version", "streammerge"),
             f"started {result['started_utc']}; details in the .md beside this plot"]
    if result["base"].get("from"):
        parts.insert(3, f"base from {result['base']['from']}")
    # no line break inside a part (textwrap does not break at a no-break space)
    return title, textwrap.fill("  ·  ".join(p.replace(" ", "\u00a0") for p in parts), width).replace("\u00a0", " ")


def _points(result: dict, xkey: str, ykey: str, styles: dict) -> list[dict]:
    """A point per model that has a score: mean over the seeds, the smallest and largest seed's value, its style."""
    scale = 100.0 if xkey == "ft_exact_match" else 1.0
    points = []
    for r in result["rows"]:
        sm = r["summary"]
        if not sm["seeds_ok"]:
            continue
        x, y = sm[xkey], sm[ykey]
        if r["kind"] == "source":
            st = {k: v for k, v in styles[r["label"]].items() if k != "label"}
        elif r["method"] == "widen" and not r.get("params"):
            st = styles["widen"]
        else:
            st = styles["merge"]
        points.append({"x": scale * x["mean"], "y": y["mean"], "xr": (scale * x["min"], scale * x["max"]),
                       "yr": (y["min"], y["max"]), "style": st, "row": r})
    return points


#: the methods whose weight rows (FT weight 1, PT weight w; run.py's SPARSE_VARIANTS) are drawn as a curve through
#: their default (w = 1): the trade-off a user gets by tuning the one knob, for the other methods to be read against
CURVES = {"task_arithmetic": "tab:purple", "linear": "tab:olive"}


def _pt_weight(row: dict) -> float | None:
    """The PT model's weight of a task_arithmetic/linear row (1 at the defaults), None for another row."""
    if row.get("method") not in CURVES or row.get("kind") != "merge":
        return None
    params = row.get("params") or {}
    if not params:
        return 1.0
    weights = str(params.get("weight", "")).split(",")
    return float(weights[1]) if set(params) == {"weight"} and len(weights) == 2 and weights[0] == "1" else None


def _curves(ax, points: list[dict]) -> None:
    """A dashed line per method of :data:`CURVES` through its rows, in the order of the PT weight."""
    for method, color in CURVES.items():
        on = sorted((w, p["x"], p["y"]) for p in points if p["row"].get("method") == method
                    and (w := _pt_weight(p["row"])) is not None)
        if len(on) >= 2:
            ax.plot([x for _, x, _ in on], [y for _, _, y in on], ls="--", lw=1.0, color=color, alpha=0.8,
                    zorder=2)


def _draw(ax, points: list[dict]) -> None:
    _curves(ax, points)
    for p in points:
        (x0, x1), (y0, y1) = p["xr"], p["yr"]
        # the mean of equal values can lie an ulp outside them: clip, matplotlib refuses a negative bar
        ax.errorbar(p["x"], p["y"], xerr=[[max(p["x"] - x0, 0.0)], [max(x1 - p["x"], 0.0)]],
                    yerr=[[max(p["y"] - y0, 0.0)], [max(y1 - p["y"], 0.0)]],
                    ls="none", capsize=2, elinewidth=0.8, zorder=4 if p["row"]["kind"] == "source" else 3,
                    **p["style"])


def _labeller(ax, renderer, points: list[dict]) -> _Labeller:
    labeller = _Labeller(ax, renderer)
    for p in points:
        labeller.block_point(p["x"], p["y"], p["style"]["ms"])
        (x0, x1), (y0, y1) = p["xr"], p["yr"]
        if x1 > x0:
            labeller.block_segment((x0, p["y"]), (x1, p["y"]))
        if y1 > y0:
            labeller.block_segment((p["x"], y0), (p["x"], y1))
    return labeller


def _label(ax, labeller: _Labeller, points: list[dict], groups: list[dict], styles: dict, only=None) -> None:
    """The source models by name, each group of merges by its number (the named ones with their name), in ``only``
    (a set of row labels) or everywhere: named labels first (they are longer), then the numbers, crowded points
    first; numbers whose markers lie on top of each other share one label (``8,10``), as do a source model and
    the merges on top of it (``FT, 1 nearswap``)."""
    import numpy as np

    where = {p["row"]["label"]: (p["x"], p["y"], p["style"]["ms"]) for p in points
             if only is None or p["row"]["label"] in only}
    mine = [(g, where[g["labels"][0]]) for g in groups if g["labels"][0] in where]
    for name in ("base", "FT", "PT"):  # a merge (two at most) on a source model shares its label: "FT, 1 nearswap"
        if name in where:
            x, y, ms = where[name]
            here = ax.transData.transform((x, y))
            on = [(g, p) for g, p in mine if np.hypot(*(ax.transData.transform(p[:2]) - here)) < 2.5][:2]
            text = ", ".join([name] + [f"{g['number']} {g['name']}" if g["name"] else str(g["number"]) for g, _ in on])
            labeller.place(x, y, text, ms, fontsize=9 if not on else 8.5, fontweight="bold",
                           color=styles[name]["color"])
            mine = [m for m in mine if m not in on]
    if not mine:
        return
    pos = np.array([ax.transData.transform(p[:2]) for _, p in mine])
    dist = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    crowd = (dist < 40).sum(axis=1)
    cluster = list(range(len(mine)))
    for i in range(len(mine)):
        for j in range(i):
            if mine[i][0]["name"] is None and mine[j][0]["name"] is None and \
                    dist[i, j] < 0.6 * mine[i][1][2] * ax.figure.dpi / 72:
                old, new = cluster[i], cluster[j]
                cluster = [new if c == old else c for c in cluster]
    labels = []
    for c in sorted(set(cluster)):
        members = [i for i in range(len(mine)) if cluster[i] == c]
        labels.append((members, (mine[members[0]][0]["name"] is None, -max(crowd[i] for i in members))))
    for members, _ in sorted(labels, key=lambda m: m[1]):
        g, (x, y, ms) = mine[members[0]]
        if g["name"]:
            labeller.place(x, y, f"{g['number']} {g['name']}", ms, fontsize=8, fontweight="bold",
                           color="tab:green" if g["widen"] else "0.1")
        else:
            text = ",".join(str(mine[i][0]["number"]) for i in sorted(members, key=lambda i: mine[i][0]["number"]))
            labeller.place(x, y, text, ms, fontsize=7.5, color="0.25")


def _zoom(ax, points: list[dict], renderer):
    """Where a zoomed inset helps: ``(region, inset)`` (data limits ``(x0, x1, y0, y1)`` of the crowded part, the
    inset's bounds in axes fraction) or ``None``. Crowded: at least 6 distinct positions (markers more than 4 pixels
    apart) within 70 pixels of the densest one; the inset goes where no marker or error bar is (nor the room to label
    one), with x and y scales of its own, where it spreads the markers most: their distance to the nearest other
    (median) at least 2.2x that in the panel."""
    import numpy as np

    if len(points) < 6:
        return None
    pos = np.array([ax.transData.transform((p["x"], p["y"])) for p in points])
    distinct: list[int] = []
    for i, q in enumerate(pos):
        if all(np.hypot(*(q - pos[j])) > 4 for j in distinct):
            distinct.append(i)
    anchors = pos[distinct]
    dist = np.hypot(*(anchors[:, None, :] - anchors[None, :, :]).transpose(2, 0, 1))
    centre = anchors[int(np.argmax((dist < 35).sum(axis=1)))]
    if (np.hypot(*(anchors - centre).T) < 70).sum() < 6:
        return None
    members = set(np.flatnonzero(np.hypot(*(pos - centre).T) < 70).tolist())
    box = ax.get_window_extent(renderer)
    every = []  # every marker and error bar end of the panel, to keep the inset (and room to label them) off them
    for p in points:
        for x, y in ((p["x"], p["y"]), (p["xr"][0], p["y"]), (p["xr"][1], p["y"]), (p["x"], p["yr"][0]),
                     (p["x"], p["yr"][1])):
            every.append(ax.transData.transform((x, y)))
    every = np.array(every)
    for _ in range(4):  # a point just outside the region would be labelled between the region and its frame:
        fit = _inset_place(ax, points, sorted(members), every, box)  # take it in, and fit again
        if fit is None:
            return None
        (gx0, gy0, gx1, gy1), bounds = fit
        close = {i for i, (qx, qy) in enumerate(pos) if gx0 - 12 < qx < gx1 + 12 and gy0 - 12 < qy < gy1 + 12}
        if close <= members:
            break
        members |= close
    inv = ax.transData.inverted()
    (dx0, dy0), (dx1, dy1) = inv.transform([(gx0, gy0), (gx1, gy1)])
    return (dx0, dx1, dy0, dy1), bounds


def _inset_place(ax, points: list[dict], members: list[int], every, box):
    """The best place for an inset of the region that holds ``members`` (markers and error bars): its region grown
    to fill the inset (display pixels) and its bounds (axes fraction), or ``None``."""
    import numpy as np

    ends = []
    for i in members:
        p = points[i]
        for x, y in ((p["xr"][0], p["y"]), (p["xr"][1], p["y"]), (p["x"], p["yr"][0]), (p["x"], p["yr"][1])):
            ends.append(ax.transData.transform((x, y)))
    ends = np.array(ends)
    pad = 14.0
    rx0, ry0 = ends.min(axis=0) - pad
    rx1, ry1 = ends.max(axis=0) + pad
    centres = np.array([ax.transData.transform((points[i]["x"], points[i]["y"])) for i in members])
    apart = np.abs(centres[:, None, :] - centres[None, :, :])  # |dx|, |dy| of every pair, display pixels
    apart = apart[~np.eye(len(centres), dtype=bool)].reshape(len(centres), len(centres) - 1, 2)
    apart = apart[:, (apart.max(axis=2) > 1).all(axis=0)] if len(centres) > 2 else apart

    def spacing(zx: float, zy: float) -> float:
        """The median distance from a marker to its nearest neighbour, at those scales."""
        return float(np.median(np.hypot(apart[..., 0] * zx, apart[..., 1] * zy).min(axis=1)))

    before = spacing(1.0, 1.0)
    best = None
    for fw, fh in ((0.5, 0.45), (0.42, 0.85), (0.34, 0.85), (0.45, 0.4), (0.28, 0.75), (0.4, 0.36), (0.36, 0.32),
                   (0.32, 0.3)):
        w, h = fw * box.width, fh * box.height
        for fx in np.arange(0.12, 0.99 - fw, 0.02):  # room for the inset's tick labels on its left and below it
            for fy in np.arange(0.08, 0.99 - fh, 0.02):
                x0, y0 = box.x0 + fx * box.width, box.y0 + fy * box.height
                ix0, iy0, ix1, iy1 = x0 - 40, y0 - 22, x0 + w + 12, y0 + h + 12  # with the tick labels, a margin
                # and room beside each marker for its label
                if ((every[:, 0] > ix0 - 60) & (every[:, 0] < ix1 + 10) & (every[:, 1] > iy0 - 16)
                        & (every[:, 1] < iy1 + 16)).any():
                    continue
                if ix0 < rx1 and rx0 < ix1 and iy0 < ry1 and ry0 < iy1:
                    continue
                zx, zy = min(10.0, w / (rx1 - rx0)), min(10.0, h / (ry1 - ry0))  # x and y scale apart
                zoom = spacing(zx, zy) / max(before, 1.0)
                far = np.hypot((x0 + w / 2) - (rx0 + rx1) / 2, (y0 + h / 2) - (ry0 + ry1) / 2)
                score = (round(2 * zoom) / 2, fw * fh, -far)  # spread most; then the larger; then the nearer
                if zoom >= 2.2 and min(zx, zy) >= 1.2 and (best is None or score > best[0]):
                    best = (score, (fx, fy, fw, fh), zx, zy, w, h)
    if best is None:
        return None
    _, bounds, zx, zy, w, h = best
    cx, cy = (rx0 + rx1) / 2, (ry0 + ry1) / 2  # the region grows to fill the inset at those scales
    return (cx - w / zx / 2, cy - h / zy / 2, cx + w / zx / 2, cy + h / zy / 2), bounds


def _panel(ax, result: dict, groups: list[dict], xkey: str, ykey: str, styles: dict, renderer) -> None:
    """One scatter: a point per model (mean over the seeds, bars from the smallest to the largest seed's value);
    the source models labelled by name, each group of merges by its number (and the named ones by name too). Where
    markers crowd, a zoomed inset shows that part again, and their numbers go there."""
    import numpy as np

    points = _points(result, xkey, ykey, styles)
    _draw(ax, points)
    xs = [p["x"] for p in points] + [v for p in points for v in p["xr"]]
    ys = [p["y"] for p in points] + [v for p in points for v in p["yr"]]
    if xs:
        span_x, span_y = max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0
        lo, hi = min(xs) - 0.07 * span_x, max(xs) + 0.07 * span_x
        if xkey == "ft_exact_match":  # percent: at least -2..10 (all 0 is common at smoke size)
            lo, hi = min(lo, -2.0), max(hi, 10.0)
        ax.set_xlim(lo, hi)
        ax.set_ylim(min(ys) - 0.07 * span_y, max(ys) + 0.07 * span_y)
    if xkey == "ft_exact_match":
        ax.set_xlabel("FT ability: exact match on held-out task prompts (%), higher is better  →")
    else:
        ax.invert_xaxis()  # right is better in every panel
        ax.set_xlabel("FT ability: cross-entropy of the held-out answers, bits/token\n"
                      "(lower is better; axis reversed)  →")
    ax.invert_yaxis()  # up is better in every panel
    ax.grid(alpha=0.3)

    labeller = _labeller(ax, renderer, points)
    zoom = _zoom(ax, points, renderer)
    inside = set()
    if zoom:
        (x0, x1, y0, y1), bounds = zoom
        inset = ax.inset_axes(bounds)
        _draw(inset, points)
        inset.set_xlim(sorted((x0, x1), reverse=bool(ax.xaxis_inverted())))
        inset.set_ylim(sorted((y0, y1), reverse=bool(ax.yaxis_inverted())))
        inset.tick_params(labelsize=7, length=2, pad=1.5)
        inset.grid(alpha=0.3)
        inset.set_facecolor("white")
        inset.set_zorder(5)
        lo_x, hi_x, lo_y, hi_y = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        inside = {p["row"]["label"] for p in points if lo_x <= p["x"] <= hi_x and lo_y <= p["y"] <= hi_y}
        frame = inset.get_window_extent(renderer)
        labeller.obstacles.append((frame.x0 - 40, frame.y0 - 22, frame.x1 + 4, frame.y1 + 4))
        indicator = ax.indicate_inset_zoom(inset, edgecolor="0.35", alpha=0.8)
        rect, connectors = indicator if isinstance(indicator, tuple) else (indicator.rectangle,
                                                                           indicator.connectors)
        ax.figure.canvas.draw()  # decides which connectors show
        for line in [rect, *connectors]:
            if line.get_visible():
                path = line.get_transform().transform_path(line.get_path())
                for a, b in zip(path.vertices[:-1], path.vertices[1:]):
                    for t in np.linspace(0, 1, 25):
                        lx, ly = a + (b - a) * t
                        labeller.soft.append((lx - 2, ly - 2, lx + 2, ly + 2))
        _label(inset, _labeller(inset, renderer, points), points, groups, styles, only=inside)
    _label(ax, labeller, points, groups, styles, only={p["row"]["label"] for p in points} - inside)


def _side(ax, fig, result: dict, groups: list[dict], styles: dict, renderer) -> None:
    """The legend and the key of the numbers, in a column beside the panels."""
    import textwrap

    from matplotlib.lines import Line2D

    n = result["seeds"]
    handles = [Line2D([], [], ls="none", **styles[k]) for k in ("base", "FT", "PT")]
    handles += [Line2D([], [], ls="none", label="WIDEN merge", **styles["widen"]),
                Line2D([], [], ls="none", label="other merges (numbered, see below)", **styles["merge"])]
    for method, color in CURVES.items():
        weights = sorted({w for r in result["rows"] if r.get("method") == method and r["summary"]["seeds_ok"]
                          and (w := _pt_weight(r)) is not None})
        if len(weights) > 1:
            shown = ", ".join(f"{w:g}" for w in weights[:-1]) + f" and {weights[-1]:g}"
            handles.append(Line2D([], [], ls="--", color=color, label=f"{method} with the PT weight at {shown} "
                                  "(FT weight 1): the one knob tuned"))
    legend = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, 1), frameon=False, fontsize=9,
                       borderaxespad=0, handletextpad=0.4, labelspacing=0.6)
    for t in legend.get_texts():
        t.set_text(textwrap.fill(t.get_text(), 52, subsequent_indent="  "))
    fig.canvas.draw()
    box = ax.transAxes.inverted().transform(legend.get_window_extent(renderer))
    top = box[0][1] - 0.02

    _, measure = _retention(result)
    lang = LANGUAGE_NAMES.get(result["corpus"]["language"], result["corpus"]["language"])
    lines: list[tuple[str, str, str, str, dict]] = []  # number, FT kept, PT kept, methods, text style
    for g in groups:
        names = [r["label"] + (f" ({ok} of {n} seeds)" if (ok := r["summary"]["seeds_ok"]) < n else "")
                 for r in g["rows"]]
        wrapped = textwrap.wrap(" = ".join(names), 46, subsequent_indent="   ", break_on_hyphens=False)
        style = dict(fontweight="bold", color="tab:green" if g["widen"] else "black") if g["name"] else \
            dict(color="0.15")
        pct = (lambda v: f"{100 * v:.0f}%".replace("-0%", "0%") if v == v else "-")
        lines.append((str(g["number"]), pct(g["ft_kept"]), pct(g["pt_kept"]), wrapped[0], style))
        lines += [("", "", "", w, style) for w in wrapped[1:]]
    failed = [r["label"] for r in result["rows"] if r["kind"] == "merge" and not r["summary"]["seeds_ok"]]
    notes = []
    if measure:
        notes.append(f"FT kept: the merge's share of the FT variant's change from the base in FT ability "
                     f"({measure}); PT kept: likewise for {lang} bits/byte (0% = the base's score, 100% = the "
                     "variant's). Ranked by the smaller of the two.")
    notes.append("(+k): k more methods with the same scores (to the table's precision), all listed here. Named on "
                 "the plots: WIDEN, task_arithmetic, TIES, the best three at keeping both, the best at each.")
    if failed:
        notes.append("No point (failed on every seed): " + ", ".join(failed) + ".")
    note_lines = [w for t in notes for w in textwrap.wrap(t, 62)]
    # font size: fit the key and the notes into what the legend leaves
    height_pt = top * ax.get_window_extent(renderer).height / (fig.dpi / 72)
    size = min(9.5, height_pt / (1.45 * (len(lines) + 2 + len(note_lines) * 0.95) + 1))
    step = 1.45 * size * (fig.dpi / 72) / ax.get_window_extent(renderer).height  # axes fraction per line
    y = top
    mono = dict(family="DejaVu Sans Mono", fontsize=size, va="top", transform=ax.transAxes)
    ax.text(0, y, "Merges, best at keeping both first", fontsize=size + 1, fontweight="bold", va="top",
            transform=ax.transAxes)
    y -= step * 1.3
    for col, (x, ha) in zip(("#", "FT kept", "PT kept", "method(s)"),
                            ((0.04, "right"), (0.17, "right"), (0.30, "right"), (0.33, "left"))):
        ax.text(x, y, col, ha=ha, fontweight="bold", **mono)
    y -= step
    for num, ftk, ptk, text, style in lines:
        for value, (x, ha) in zip((num, ftk, ptk), ((0.04, "right"), (0.17, "right"), (0.30, "right"))):
            if value:
                ax.text(x, y, value, ha=ha, **mono, **style)
        ax.text(0.33, y, text, ha="left", va="top", fontsize=size, transform=ax.transAxes, **style)
        y -= step
    y -= step * 0.5
    for t in note_lines:
        ax.text(0, y, t, fontsize=size * 0.95, va="top", color="0.3", transform=ax.transAxes)
        y -= step * 0.95


def plot(result: dict, path: Path) -> None:
    """Top row (the figure the issue asks for): FT exact match against the new language's bits per byte, and
    against English bits per byte. Bottom row: the same with the FT answers' cross-entropy on x, which still
    separates methods where exact match is 0 for all of them. Up and right are better in every panel. Beside them:
    the legend and the key of the merges' numbers (ranked by how much of both abilities they keep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lang = LANGUAGE_NAMES.get(result["corpus"]["language"], result["corpus"]["language"])
    what = _descriptions(result)
    styles = {"base": dict(marker="s", color="black", ms=10, label=what["base"]),
              "FT": dict(marker="^", color="tab:blue", ms=11, label=what["FT"]),
              "PT": dict(marker="D", color="tab:red", ms=9, label=what["PT"]),
              "widen": dict(marker="*", color="tab:green", ms=15),
              "merge": dict(marker="o", color="tab:gray", ms=6)}
    ylabels = {"new_bpb": f"PT ability: {lang} bits per byte, held out\n(lower is better; axis reversed)  →",
               "en_bpb": "what the base knew: English bits per byte, held out\n(lower is better; axis reversed)  →"}
    groups = _groups(result)
    fig = plt.figure(figsize=(19, 13.5), dpi=110)
    renderer = fig.canvas.get_renderer()
    title, subtitle = _titles(result, 190)
    fig.text(0.5, 0.985, title, ha="center", va="top", fontsize=15, fontweight="bold")
    fig.text(0.5, 0.958, subtitle, ha="center", va="top", fontsize=9.5, color="0.25", linespacing=1.4)
    top = 0.915 if "\n" in subtitle else 0.93
    gs = fig.add_gridspec(2, 2, left=0.055, right=0.70, bottom=0.055, top=top, wspace=0.2, hspace=0.2)
    for row, xkey in enumerate(("ft_exact_match", "ft_answer_bits")):
        for col, ykey in enumerate(("new_bpb", "en_bpb")):
            ax = fig.add_subplot(gs[row, col])
            ax.set_ylabel(ylabels[ykey])
            _panel(ax, result, groups, xkey, ykey, styles, renderer)
    side = fig.add_axes((0.725, 0.055, 0.265, top - 0.055))
    side.axis("off")
    _side(side, fig, result, groups, styles, renderer)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(
        description="Re-render the plot (RESULTS.png) and the Markdown report (RESULTS.md) of bench/quality/run.py "
        "from its results JSON, without running the experiment again. Writes beside the JSON, overwriting.")
    ap.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json",
                    help="a results JSON of bench/quality/run.py (bench/results/<stamp>-quality*.json, not the "
                    "-analyze- ones)")
    ap.add_argument("--no-md", action="store_true", help="only the plot; leave RESULTS.md as it is")
    args = ap.parse_args(argv)
    for source in args.results:
        result = json.loads(source.read_text())
        if result.get("kind") != "quality" or "rows" not in result:
            raise SystemExit(f"{source}: not a results JSON of bench/quality/run.py (an -analyze- file?)")
        png = source.with_suffix(".png")
        plot(result, png)
        print(png)
        if not args.no_md:
            result.setdefault("plot", png.name)
            source.with_suffix(".md").write_text(markdown(result))
            print(source.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
