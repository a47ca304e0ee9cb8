#!/usr/bin/env python
"""Does a merge keep both abilities? A miniature of the WIDEN paper's FT + PT experiment, on this CPU.

    nice -n 19 .venv/bin/python bench/quality/run.py            # default mode (~20-30 min on 2 cores)
    nice -n 19 .venv/bin/python bench/quality/run.py --smoke    # tiny sizes, end to end in under 2 minutes

1. Train a tiny byte-level Qwen2 base from scratch on English (Debian documentation, gettext msgids).
2. Per seed: an FT variant (short instruction tuning on synthetic exact-match tasks) and a PT variant (continued
   pre-training on one language's gettext msgstrs, Vietnamese by default); ``streammerge analyze`` of both.
3. Per seed, every method ``streammerge methods`` lists, through the real CLI (``streammerge merge``).
4. Score base, FT, PT and every merge: exact match on held-out FT prompts, bits per byte on held-out text of the
   new language and of English. Write ``<results>/<UTC stamp>-quality[-smoke].{json,md,png}`` and the analyze
   JSON and plot per seed. See bench/quality/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from corpus import build_corpus, pretrain_format, task_examples
from report import markdown, plot
from tinylm import (
    SIZES,
    bits_per_byte,
    fixed_windows,
    lm_batch,
    load,
    new_model,
    packed_task_batch,
    random_windows,
    save,
    task_scores,
    train,
)

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent

#: parameters given beyond the defaults, as extra rows: mergekit's usual sparsity (every density defaults to 1.0
#: here, which keeps every delta element); breadcrumbs keeps its default gamma 0.01
#: rows beyond the defaults (default mode): the sparse methods at a density that drops something, and task
#: arithmetic and linear with the PT model's weight turned down (FT weight 1, PT 0.5 / 0.75 / 0.9, and 0.8 for task
#: arithmetic, where its best trade-off lay in the runs of 2026-12-01), the one knob
#: a user would tune first; their trade-off curve is what a method at its defaults is compared with
SPARSE_VARIANTS = {
    "ties": [{"density": "0.5"}], "dare_linear": [{"density": "0.5"}], "dare_ties": [{"density": "0.5"}],
    "della": [{"density": "0.5"}], "della_linear": [{"density": "0.5"}],
    "breadcrumbs": [{"density": "0.9"}], "breadcrumbs_ties": [{"density": "0.9"}],
    "task_arithmetic": [{"weight": f"1,{w}"} for w in ("0.5", "0.75", "0.8", "0.9")],
    "linear": [{"weight": f"1,{w}"} for w in ("0.5", "0.75", "0.9")],
}


@dataclass(frozen=True)
class Settings:
    """Sizes and training schedules of one mode."""

    size: str
    english_doc_bytes: int  # documentation read (the first doc_per_file bytes of each file)
    doc_per_file: int
    all_catalogs: bool  # English msgids from every language's catalogs (else the new language's only)
    base_steps: int
    base_lr: float
    batch: int
    ft_steps: int
    ft_lr: float
    ft_length: int  # tokens per packed FT sequence
    ft_rows: int  # FT batch: rows of packed task examples
    ft_text_rows: int  # FT batch: rows of English text (replay)
    pt_steps: int
    pt_lr: float
    word_len: tuple[int, int]  # letters in a task's word
    eval_examples: int
    eval_windows: int
    sparse_variants: bool
    ft_style: str = "adam"  # see FT_STYLES
    ft_optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    base_task_rows: int = 0  # base batch: rows of packed task examples in the base's own prompt format (else 0)
    base_task_formats: int = 1  # how many of corpus.PRETRAIN_PROMPTS those rows use, in turn
    ft_replay_rows: int = 0  # FT batch: rows of task examples in the base's formats (keeps them; else forgotten)
    pt_style: str = "full"  # see PT_STYLES


MODES = {
    "smoke": Settings(size="smoke", english_doc_bytes=3_000_000, doc_per_file=8192, all_catalogs=False,
                      base_steps=150, base_lr=3e-3, batch=8, ft_steps=60, ft_lr=1e-3, ft_length=96, ft_rows=6,
                      ft_text_rows=2, pt_steps=60, pt_lr=3e-3, word_len=(2, 4), eval_examples=96, eval_windows=16,
                      sparse_variants=False),
    "default": Settings(size="default", english_doc_bytes=40_000_000, doc_per_file=16384, all_catalogs=True,
                        base_steps=1200, base_lr=3e-3, batch=16, ft_steps=300, ft_lr=1e-3, ft_length=128,
                        ft_rows=18, ft_text_rows=6, pt_steps=600, pt_lr=3e-3, word_len=(3, 5), eval_examples=400,
                        eval_windows=96, sparse_variants=True),
}


#: ``--ft-style``: overrides of a mode's settings, per mode. ``adam`` (the default) is the first design: AdamW, lr 1e-3,
#: 300 steps (‖Δ‖/‖B‖ about 17%). ``sgd``: SGD with momentum 0.9, lr 0.1, 400 steps: the same FT data, about 13%, and
#: a higher exact match (AdamW moves every element by about ``lr`` a step, even where its gradient is only noise;
#: SGD moves each element in proportion to its gradient). See README "A second FT variant".
FT_STYLES: dict[str, dict[str, dict]] = {
    "adam": {"smoke": {}, "default": {}},
    "sgd": {"smoke": {"ft_style": "sgd", "ft_optimizer": "sgd", "ft_lr": 0.1},
            "default": {"ft_style": "sgd", "ft_optimizer": "sgd", "ft_lr": 0.1, "ft_steps": 400}},
    "format": {"smoke": {"ft_style": "format", "base_task_rows": 2, "base_task_formats": 4, "ft_optimizer": "sgd",
                         "ft_lr": 0.01, "ft_rows": 4, "ft_replay_rows": 2, "ft_text_rows": 0},
               "default": {"ft_style": "format", "base_task_rows": 6, "base_task_formats": 4, "ft_optimizer": "sgd",
                           "ft_lr": 0.003, "ft_steps": 300, "ft_rows": 12, "ft_replay_rows": 6, "ft_text_rows": 0}},
}


#: ``--pt-style``: overrides for the PT variant, per mode. ``full`` (the default): 600 steps at lr 3e-3 (‖Δ‖/‖B‖ about
#: 55-58%, far above the paper's PT, about 0.5%). ``light``: 200 steps at lr 3e-4 (about 9% from the ``format`` base):
#: less Vietnamese, but it keeps more of what the base could do. See README "A third FT variant".
PT_STYLES: dict[str, dict[str, dict]] = {
    "full": {"smoke": {}, "default": {}},
    "light": {"smoke": {"pt_style": "light", "pt_lr": 1e-3}, "default": {"pt_style": "light", "pt_lr": 3e-4,
                                                                          "pt_steps": 200}},
}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- streammerge CLI
def list_methods(cli: str) -> list[dict]:
    """Every method of ``streammerge methods``: name, how many models it takes, its parameter names."""
    text = subprocess.run([cli, "methods"], capture_output=True, text=True, check=True).stdout
    methods: list[dict] = []
    for line in text.splitlines():
        head = re.match(r"^(\w+)\s+\(origin: [^;]+; models besides the base: ([^;]+);", line)
        if head:
            methods.append({"name": head.group(1), "models": head.group(2), "params": []})
        elif methods and (param := re.match(r"^\s{4}(\w+) \(", line)):
            methods[-1]["params"].append(param.group(1))
    if not methods:
        raise SystemExit(f"could not read the methods from `{cli} methods`:\n{text}")
    return methods


def variants(methods: list[dict], sparse: bool) -> list[dict]:
    """One merge per method at its defaults, plus (``sparse``) the rows of :data:`SPARSE_VARIANTS`.

    A method that takes exactly one model besides the base cannot take FT and PT onto the base: it runs as
    mergekit's two-model form instead, ``--base FT --model PT`` (the FT model as the base endpoint)."""
    out = []
    for m in methods:
        pair = m["models"].startswith("exactly 1")
        call = "FT + PT (FT as --base)" if pair else "base + FT + PT"
        seeded = "seed" in m["params"]  # --seed is refused by methods that draw no random masks
        out.append({"label": m["name"], "method": m["name"], "params": {}, "call": call, "pair": pair,
                    "seeded": seeded})
        for extra in SPARSE_VARIANTS.get(m["name"], []) if sparse else []:
            if set(extra) <= set(m["params"]):
                label = m["name"] + " " + " ".join(f"{k}={v}" for k, v in extra.items())
                out.append({"label": label, "method": m["name"], "params": extra, "call": call, "pair": pair,
                            "seeded": seeded})
    return out


def run_cli(cmd: list[str]) -> tuple[bool, str, float]:
    """Run a streammerge command; (ok, stdout or the error's last lines, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        return False, f"exit {proc.returncode}: {tail}", seconds
    return True, proc.stdout, seconds


def relative_change_fallback(base: Path, models: list[Path]) -> list[float]:
    """‖Δ‖/‖B‖ over every stored tensor, as analyze defines it (used only when the CLI fails; labelled so)."""
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    out = []
    for m in models:
        t = load_file(str(m / "model.safetensors"))
        num = sum(float(((t[k].double() - b[k].double()) ** 2).sum()) for k in b)
        den = sum(float((b[k].double() ** 2).sum()) for k in b)
        out.append((num / den) ** 0.5)
    return out


def analyze(cli: str, base: Path, ft: Path, pt: Path, json_path: Path, png_path: Path) -> dict:
    """``streammerge analyze --json --plot`` of FT and PT against the base; the whole-model figures."""
    # folders relative to the working directory, so the committed figures name no machine's absolute paths
    folders = [os.path.relpath(p) for p in (base, ft, pt)]
    ok, out, seconds = run_cli([cli, "analyze", "--base", folders[0], "--model", folders[1], "--model", folders[2],
                                "--device", "cpu", "--json", "-q", "--plot", str(png_path)])
    if ok:
        json_path.write_text(out)
        data = json.loads(out)
        ft_m, pt_m = data["model"]["models"]
        ft_rc, pt_rc = ft_m["relative_change"], pt_m["relative_change"]
        pair = data["model"]["pairs"][0]
        return {"source": "streammerge analyze", "ft": ft_rc, "pt": pt_rc, "pt_over_ft": pt_rc / ft_rc,
                "ft_mean_abs": ft_m["mean_abs_change"], "pt_mean_abs": pt_m["mean_abs_change"],
                "cosine": pair["cosine"], "sign_conflict": pair["sign_conflict"],
                "verdict": data.get("verdict"), "json": json_path.name, "plot": png_path.name,
                "seconds": round(seconds, 2)}
    log(f"streammerge analyze failed, using the bench's own ‖Δ‖/‖B‖: {out}")
    ft_rc, pt_rc = relative_change_fallback(base, [ft, pt])
    return {"source": "bench fallback (streammerge analyze failed)", "error": out, "ft": ft_rc, "pt": pt_rc,
            "pt_over_ft": pt_rc / ft_rc}


# ----------------------------------------------------------------------------------------------- scoring
class Scorer:
    """The fixed evaluation sets, and the scores of a model folder."""

    def __init__(self, corpus, settings: Settings, context: int) -> None:
        self.examples = task_examples(settings.eval_examples, seed=99, lo=settings.word_len[0],
                                      hi=settings.word_len[1], evaluation=True)
        # --ft-style format: the same held-out prompts in the base's own format (what pre-training taught)
        self.pre_examples = pretrain_format(self.examples) if settings.base_task_rows else None
        self.new_windows = fixed_windows(corpus.new_test, settings.eval_windows, context)
        self.en_windows = fixed_windows(corpus.en_test, settings.eval_windows, context)

    def __call__(self, path: Path) -> dict:
        model = load(path)
        tasks = task_scores(model, self.examples)
        out = {"ft_exact_match": tasks["exact_match"], "ft_per_task": tasks["per_task"],
               "ft_answer_bits": tasks["answer_bits_per_byte"],
               "new_bpb": bits_per_byte(model, self.new_windows), "en_bpb": bits_per_byte(model, self.en_windows)}
        if self.pre_examples:
            pre = task_scores(model, self.pre_examples)
            out.update(pre_exact_match=pre["exact_match"], pre_per_task=pre["per_task"],
                       pre_answer_bits=pre["answer_bits_per_byte"])
        return out


# ----------------------------------------------------------------------------------------------- the pipeline
def train_base(corpus, s: Settings, out: Path, seed: int) -> dict:
    """English from scratch. With ``s.base_task_rows`` (``--ft-style format``), that many rows of each batch are
    packed task examples in the base's own prompt formats (``Q: reverse abc\\nA: cba``, ...; ``s.base_task_formats``
    of ``corpus.PRETRAIN_PROMPTS`` in turn; the answers and ``</s>`` are the targets), so the base can already do
    the tasks, in formats the evaluation does not use."""
    size = SIZES[s.size]
    model = new_model(size, seed)
    rng = np.random.default_rng(seed)
    docs_share = corpus.en_docs.size / (corpus.en_docs.size + 3 * corpus.en_msgids.size)  # msgids weighted x3
    text_rows = s.batch - s.base_task_rows
    if s.base_task_rows:
        examples = pretrain_format(task_examples(20000, seed=500 + seed, lo=s.word_len[0], hi=s.word_len[1],
                                                 evaluation=False), s.base_task_formats)
        task_rng = random.Random(500 + seed)

    def batch() -> dict:
        n_docs = int(rng.binomial(text_rows, docs_share))
        parts = [random_windows(corpus.en_docs, n_docs, size.context, rng)] if n_docs else []
        if text_rows - n_docs:
            parts.append(random_windows(corpus.en_msgids, text_rows - n_docs, size.context, rng))
        text = lm_batch(torch.cat(parts))
        if not s.base_task_rows:
            return text
        tasks = packed_task_batch(examples, s.base_task_rows, size.context + 1, task_rng)
        return {k: torch.cat([text[k], tasks[k]]) for k in ("input_ids", "labels")}

    t0 = time.perf_counter()
    losses = train(model, batch, s.base_steps, s.base_lr, warmup=max(10, s.base_steps // 15), weight_decay=0.1,
                   seed=seed, label="base")
    save(model, out)
    return {"params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0,
            "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def train_ft(base: Path, corpus, s: Settings, out: Path, seed: int) -> dict:
    """Instruction tuning: each batch is rows of packed task examples (the answers are the targets) and a quarter as
    many rows of English text (next-byte targets), as chat data is natural language; without any, the variant
    forgets English."""
    model = load(base)
    examples = task_examples(20000, seed=seed, lo=s.word_len[0], hi=s.word_len[1], evaluation=False)
    if s.ft_replay_rows:  # --ft-style format: the base's own formats, so that the FT does not overwrite them
        replay = pretrain_format(task_examples(20000, seed=seed + 7, lo=s.word_len[0], hi=s.word_len[1],
                                               evaluation=False), s.base_task_formats)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)

    def batch() -> dict:
        tasks = packed_task_batch(examples, s.ft_rows, s.ft_length, rng)
        if s.ft_replay_rows:
            old = packed_task_batch(replay, s.ft_replay_rows, s.ft_length, rng)
            tasks = {k: torch.cat([tasks[k], old[k]]) for k in ("input_ids", "labels")}
        if not s.ft_text_rows:
            return tasks
        text = lm_batch(random_windows(corpus.en_docs, s.ft_text_rows, s.ft_length - 1, np_rng))
        return {k: torch.cat([tasks[k], text[k]]) for k in ("input_ids", "labels")}

    t0 = time.perf_counter()
    losses = train(model, batch, s.ft_steps, s.ft_lr, warmup=max(5, s.ft_steps // 10), weight_decay=0.0, seed=seed,
                   label=f"FT seed {seed}", optimizer=s.ft_optimizer)
    save(model, out)
    return {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def train_pt(base: Path, corpus, s: Settings, out: Path, seed: int) -> dict:
    model = load(base)
    context = SIZES[s.size].context
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    losses = train(model, lambda: lm_batch(random_windows(corpus.new_train, s.batch, context, rng)), s.pt_steps,
                   s.pt_lr, warmup=max(5, s.pt_steps // 10), weight_decay=0.0, seed=seed, label=f"PT seed {seed}")
    save(model, out)
    return {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean, min, max and sample standard deviation over the seeds of each score (seeds whose merge failed left
    out)."""
    good = [v for v in per_seed.values() if "error" not in v]
    out: dict = {"seeds_ok": len(good)}
    for key in ("ft_exact_match", "ft_answer_bits", "new_bpb", "en_bpb", "pre_exact_match", "pre_answer_bits"):
        vals = [v[key] for v in good if key in v]
        if vals:
            out[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, defaults only: end to end in under 2 minutes")
    ap.add_argument("--seeds", type=int, default=2, help="seeds (FT/PT training and merge seed); default 2")
    ap.add_argument("--language", default="vi", help="the PT variant's language (gettext catalogs); default vi")
    ap.add_argument("--ft-style", choices=sorted(FT_STYLES), default="adam",
                    help="how the FT variant trains: adam (default; AdamW lr 1e-3), sgd (SGD momentum 0.9, lr 0.1: "
                    "a smaller weight change) or format (the base is pre-trained with the tasks in another prompt "
                    "format; the FT only teaches the evaluation's format); see FT_STYLES")
    ap.add_argument("--pt-style", choices=sorted(PT_STYLES), default="full",
                    help="how the PT variant trains: full (default; 600 steps, lr 3e-3) or light (200 steps, lr 3e-4: "
                    "a smaller change that forgets less); see PT_STYLES")
    ap.add_argument("--ft-lr", type=float, default=None,
                    help="the FT variant's learning rate instead of its style's (a larger one moves the weights "
                    "further: with --ft-style format, 0.01 puts the FT's mean |Δ| inside the paper's FT band, 0.00057)")
    ap.add_argument("--base-from", type=Path, default=None,
                    help="use this base (trained by an earlier run of the same mode) instead of training one")
    ap.add_argument("--work", type=Path, default=None,
                    help="models (default bench/work/quality; bench/work/quality-STYLE for another --ft-style)")
    ap.add_argument("--results", type=Path, default=BENCH / "results", help="reports (default bench/results)")
    ap.add_argument("--streammerge", default=None, help="the streammerge executable (default: beside this python)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--keep-merges", action="store_true", help="keep the merged folders (default: deleted)")
    args = ap.parse_args(argv)

    wall0 = time.perf_counter()
    mode = "smoke" if args.smoke else "default"
    s = replace(MODES[mode], **FT_STYLES[args.ft_style][mode], **PT_STYLES[args.pt_style][mode])
    if args.ft_lr is not None:
        s = replace(s, ft_lr=args.ft_lr)
    pt_tag = ("" if args.pt_style == "full" else f"-pt{args.pt_style}") + \
        ("" if args.ft_lr is None else f"-ftlr{args.ft_lr:g}")
    if args.work is None:
        args.work = BENCH / "work" / (("quality" if args.ft_style == "adam" else f"quality-{args.ft_style}") + pt_tag)
    cli = args.streammerge or str(Path(sys.executable).parent / "streammerge")
    if not Path(cli).exists():
        cli = shutil.which("streammerge") or cli
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stem = f"{started}-quality" + ("" if args.ft_style == "adam" else f"-{args.ft_style}") + pt_tag + \
        ("-smoke" if args.smoke else "")
    phases: dict[str, float] = {}
    load_start = os.getloadavg()

    t = time.perf_counter()
    corpus = build_corpus(args.language, s.english_doc_bytes, s.doc_per_file, s.all_catalogs)
    phases["corpus"] = time.perf_counter() - t
    log(f"corpus in {phases['corpus']:.1f} s: {corpus.stats['bytes']} ({corpus.language})")
    if corpus.stats["language_note"]:
        log(corpus.stats["language_note"])

    methods = list_methods(cli)
    if args.methods:
        wanted = set(args.methods.split(","))
        methods = [m for m in methods if m["name"] in wanted]
    merges = variants(methods, s.sparse_variants)
    version = subprocess.run([cli, "--version"], capture_output=True, text=True).stdout.strip()

    t = time.perf_counter()
    if args.base_from:
        base = args.base_from
        base_info = {"params": sum(p.numel() for p in load(base).parameters()), "seconds": 0.0,
                     "from": str(base), "note": "trained by an earlier run (--base-from)"}
        log(f"base: {base_info['params']} parameters, from {base}")
    else:
        base = args.work / "base"
        base_info = train_base(corpus, s, base, seed=0)
        log(f"base: {base_info['params']} parameters, trained in {base_info['seconds']:.0f} s")
    phases["base"] = time.perf_counter() - t
    scorer = Scorer(corpus, s, SIZES[s.size].context)

    rows: dict[str, dict] = {}

    def row(label: str, kind: str, **extra) -> dict:
        return rows.setdefault(label, {"label": label, "kind": kind, "per_seed": {}, **extra})

    base_scores = scorer(base)
    phases.update(ft=0.0, pt=0.0, analyze=0.0, merge=0.0, score=0.0)
    changes: dict[int, dict] = {}
    training: dict[int, dict] = {}
    for seed in range(args.seeds):
        seed_all(seed)
        folder = args.work / f"seed{seed}"
        ft, pt = folder / "ft", folder / "pt"
        t = time.perf_counter()
        training[seed] = {"ft": train_ft(base, corpus, s, ft, seed=1000 + seed)}
        phases["ft"] += time.perf_counter() - t
        t = time.perf_counter()
        training[seed]["pt"] = train_pt(base, corpus, s, pt, seed=2000 + seed)
        phases["pt"] += time.perf_counter() - t
        t = time.perf_counter()
        changes[seed] = analyze(cli, base, ft, pt, args.results / f"{stem}-analyze-seed{seed}.json",
                                args.results / f"{stem}-analyze-seed{seed}.png")
        phases["analyze"] += time.perf_counter() - t
        log(f"seed {seed}: ‖Δ‖/‖B‖ FT {changes[seed]['ft']:.4f}, PT {changes[seed]['pt']:.4f} "
            f"({changes[seed]['pt_over_ft']:.1f}x; {changes[seed]['source']})")
        t = time.perf_counter()
        row("base", "source", call="-", params={})["per_seed"][seed] = base_scores
        row("FT", "source", call="-", params={})["per_seed"][seed] = scorer(ft)
        row("PT", "source", call="-", params={})["per_seed"][seed] = scorer(pt)
        phases["score"] += time.perf_counter() - t
        for v in merges:
            out = folder / "merged" / re.sub(r"[^\w.=-]+", "_", v["label"])
            inputs = ["--base", str(ft), "--model", str(pt)] if v["pair"] else \
                ["--base", str(base), "--model", str(ft), "--model", str(pt)]
            cmd = [cli, "merge", *inputs, "--method", v["method"], "--device", "cpu", "--out", str(out), "-q",
                   "--force", *(["--seed", str(seed)] if v["seeded"] else [])]
            for k, val in v["params"].items():
                cmd += ["--param", f"{k}={val}"]
            out.parent.mkdir(parents=True, exist_ok=True)
            ok, msg, seconds = run_cli(cmd)
            phases["merge"] += seconds
            r = row(v["label"], "merge", method=v["method"], call=v["call"], params=v["params"])
            if not ok:
                r["per_seed"][seed] = {"error": msg}
                log(f"seed {seed}: {v['label']}: merge failed: {msg.splitlines()[0]}")
                continue
            t = time.perf_counter()
            r["per_seed"][seed] = {**scorer(out), "merge_seconds": round(seconds, 2)}
            phases["score"] += time.perf_counter() - t
            sc = r["per_seed"][seed]
            log(f"seed {seed}: {v['label']:<28} EM {sc['ft_exact_match']:.3f}  new {sc['new_bpb']:.3f}  "
                f"en {sc['en_bpb']:.3f} bpb  ({seconds:.1f} s merge)")
            if not args.keep_merges:
                shutil.rmtree(out, ignore_errors=True)

    for r in rows.values():
        r["summary"] = aggregate(r["per_seed"])
    phases["total"] = time.perf_counter() - wall0
    result = {
        "kind": "quality", "mode": mode, "started_utc": started,
        "finished_utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "seconds": phases,
        "seeds": args.seeds, "streammerge": version, "cli": cli,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(), "nice": os.nice(0)},
        "settings": {**asdict(s), "model": asdict(SIZES[s.size]), "sparse_variants": SPARSE_VARIANTS},
        "corpus": corpus.stats, "base": base_info, "training": training, "relative_change": changes,
        "eval": {"ft_examples": len(scorer.examples), "windows": s.eval_windows,
                 "window_bytes": SIZES[s.size].context},
        "rows": list(rows.values()),
    }
    png = args.results / f"{stem}.png"
    result["plot"] = png.name
    # the figures first: a plotting error must not lose a run (bench/quality/report.py redraws from the JSON)
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(result)
    (args.results / f"{stem}.md").write_text(md)
    plot(result, png)
    print(md)
    log(f"wrote {args.results / stem}.{{json,md,png}} in {phases['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
