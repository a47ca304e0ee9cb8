"""The verdict of ``streammerge analyze``: what the figures say, in plain words, and the methods they point to.

The figures are weight statistics. Claims about merge quality are the WIDEN paper's (Yu et al. 2024, *Extend Model
Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight Disentanglement*, arXiv:2408.03092), cited
as such; streammerge measures no quality. Thresholds:

- the figures quoted are those of the **weights**: every tensor of two or more dimensions but norms (the table's
  "weights (no norms)" rows);
- a **gap** is a ratio of at least :data:`GAP` between the largest and the smallest relative change ``‖Δ‖/‖B‖`` of
  the weights (every tensor of two or more dimensions but norms: norm weights near 1, and biases, would otherwise
  weigh in ``‖B‖`` out of proportion to their share of the parameters). The paper's fine-tuned (FT) models change
  their parameters by about 0.0005–0.002 and its continually pre-trained (PT) one by about 0.005, a ratio of 2.5
  to 10. Those are absolute changes per parameter (weight units, compared here with the mean ``|Δ|``), not
  fractions of the weights; the ratio, unlike the sizes, does not depend on the scale of the weights, so the gap is
  judged on the relative change (the paper's 2.5–10 is a ratio of mean ``|Δ|``; the two ratios differ when the models
  change small and large weights differently: 10× against 18× in bench/quality). A gap is called PT-like only when the changes are not alike (a model whose change
  points the same way as another's, only longer, is a stronger copy of it) and the larger change is above the
  paper's FT band (mean ``|Δ|`` over :data:`FT_BAND_TOP`); otherwise the verdict says what the gap is not;
- two models' changes are **alike** at a cosine of at least 0.5, **unrelated** at a cosine within ±0.1 with a sign
  conflict of at least 40% (unrelated changes give a cosine near 0 and a sign conflict near 50%);
- a model is a **sparse update** when at least half of its elements are unchanged;
- a module kind **stands out** when its relative change is at least twice that of every other kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .figures import Figures, PairFigures

#: ratio of the largest to the smallest relative change from which the models are said to differ like PT and FT
GAP = 2.5
#: the top of the paper's FT band: fine-tuned models change their parameters by about 0.0005–0.002 (mean |Δ|)
FT_BAND_TOP = 0.002
#: the cosine of two models' deltas from which their changes are called alike
ALIKE = 0.5
CAVEAT = ("These are weight statistics: they say how the models differ from the base, not how well a merge will "
          "work. Merge quality is not measured here; evaluate the merged model on the tasks you care about.")
PAPER = "the WIDEN paper (Yu et al. 2024, arXiv:2408.03092)"


@dataclass(frozen=True)
class Verdict:
    """What the figures say (``findings``), the methods they point to (``suggestions``), and the figures behind the
    main one: the ratio of the largest to the smallest relative change (``change_ratio``, None with one model or a
    zero change) and which models those are (1-based)."""

    findings: tuple[str, ...]
    suggestions: tuple[str, ...]
    change_ratio: float | None
    largest: int | None
    smallest: int | None
    caveat: str = CAVEAT

    def to_json(self) -> dict[str, Any]:
        return {"findings": list(self.findings), "suggestions": list(self.suggestions),
                "change_ratio": self.change_ratio, "largest_change": self.largest, "smallest_change": self.smallest,
                "gap_threshold": GAP, "caveat": self.caveat}


def _pct(x: float) -> str:
    return f"{100 * x:#.3g}".rstrip(".") + "%"  # 3 significant digits: 11.0%, 0.500%


def _span(values: list[float], fmt: Callable[[float], str]) -> str:
    """``fmt`` of the value, or of the smallest and largest when they read differently (``a to b``)."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


def _pair_figures(pairs: list[PairFigures], top_k: float, references: bool = False) -> str:
    """Cosine, sign conflict and top-k overlap of ``pairs`` (a range over several), with what unrelated changes
    give when ``references``."""
    parts = [f"cosine {_span([p.cosine or 0.0 for p in pairs], lambda x: f'{x:+.2f}')}"
             + (", near 0 for unrelated changes" if references else "")]
    conflicts = [p.sign_conflict for p in pairs if p.sign_conflict is not None]
    parts.append(f"signs disagree on {_span(conflicts, _pct)} of the elements both changed"
                 + (", near 50% for unrelated changes" if references else "") if conflicts
                 else "no element was changed by both")
    overlaps = [p.top_k_overlap for p in pairs if p.top_k_overlap is not None]
    if overlaps:
        parts.append(f"the top {top_k:g}% largest changes share {_span(overlaps, _pct)} of elements (chance: "
                     f"{top_k:g}%)")
    return "; ".join(parts)


def make_verdict(whole: Figures, modules: tuple[Figures, ...], names: tuple[str, ...], top_k: float) -> Verdict:
    """The verdict from the figures of the weights (``whole``: :attr:`~streammerge.analysis.core.Analysis.weights`),
    the module kinds' and the models' names (``--model`` order)."""
    findings: list[str] = []
    suggestions: list[str] = []
    who = {k: f"model {k} ({name})" for k, name in enumerate(names, 1)}
    changed = []
    for m in whole.models:
        if m.delta_norm == 0:
            findings.append(f"{who[m.model]} is identical to the base in every analyzed tensor: sums of deltas (task "
                            "arithmetic, TIES) are unchanged by it, while averages and WIDEN's scores count it.")
        elif m.relative_change is not None:
            changed.append(m)
    ratio = largest = smallest = None
    if len(changed) >= 2:
        hi = max(changed, key=lambda m: m.relative_change or 0.0)
        lo = min(changed, key=lambda m: m.relative_change or 0.0)
        ratio, largest, smallest = (hi.relative_change or 0.0) / (lo.relative_change or 1.0), hi.model, lo.model
        times = f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"
        shift = (f"{who[hi.model]} changed its weights {times}× as much as {who[lo.model]} (weights, no norms: "
                 f"‖Δ‖/‖B‖ {_pct(hi.relative_change or 0.0)} against {_pct(lo.relative_change or 0.0)}; mean |Δ| "
                 f"{hi.mean_abs_change:.3g} against {lo.mean_abs_change:.3g})")
        pair = next((p for p in whole.pairs if set(p.models) == {hi.model, lo.model}), None)
        alike = pair is not None and pair.cosine is not None and pair.cosine >= ALIKE
        if ratio >= GAP and alike:
            assert pair is not None and pair.cosine is not None
            findings.append(f"{shift}, in the same direction (cosine of the deltas {pair.cosine:+.2f}): the larger "
                            "change looks like a stronger version of the smaller one, not a different kind of "
                            f"training, which is the case {PAPER} studies (a fine-tune merged with a continually "
                            "pre-trained model).")
            suggestions.append("linear or task_arithmetic with a weight: the changes point the same way, so a merge "
                               "mostly sets how far along it to go; or use the stronger model as it is")
        elif ratio >= GAP and hi.mean_abs_change <= FT_BAND_TOP:
            findings.append(
                f"{shift}: a ratio like the one {PAPER} reports between a continually pre-trained (PT) and a "
                f"fine-tuned (FT) model, but both changes are within the paper's FT band (mean |Δ| up to about "
                f"{FT_BAND_TOP:g} per parameter, weight units), so these may be two fine-tunes of different strength "
                "rather than an FT and a PT model. The paper's merging results are for an FT model with a PT one.")
            suggestions.append("widen: it ranks each model's changes within that model, so the larger change does "
                               "not swamp the smaller one; task_arithmetic, ties or dare_ties with a smaller weight "
                               "for the larger change are the classic alternative; compare them")
        elif ratio >= GAP:
            findings.append(
                f"{shift}: a gap like that between a continually pre-trained (PT) and a fine-tuned (FT) model. "
                f"{PAPER[0].upper() + PAPER[1:]} reports FT changes of about 0.0005–0.002 per parameter (weight "
                "units, like the mean |Δ|) against about 0.005 for PT, and that merging an FT model (Qwen1.5-Chat) "
                "with a PT one (Sailor), task arithmetic, TIES, Breadcrumbs and DARE usually either lost both abilities or kept only the FT model's, while WIDEN "
                "kept most of both (14B, multilingual average: WIDEN 59.67, Sailor 59.90, best of average and task "
                "arithmetic 40.72, best of TIES, Breadcrumbs and DARE 28.69).")
            suggestions.append("widen: the paper's method for this case; it ranks each model's changes within that "
                               "model, so the larger shift does not swamp the smaller one")
            suggestions.append(f"task_arithmetic, ties, dare_ties: per the paper, likely to lose the ability of "
                               f"{who[hi.model]} here at equal weights; in streammerge's own miniature of this setting "
                               f"(bench/quality) TIES dropped the smaller change instead (here model {lo.model}'s), "
                               "and task arithmetic with the larger change's weight turned down to about 0.8 came "
                               "close to widen (below the paper's FT band: level on the PT ability and 0.13 bits/byte "
                               "worse on English; inside the band: behind on both): if you try them, tune that "
                               "weight and compare")
        else:
            findings.append(f"{shift}: changes of a similar size (under {GAP}×), the setting the classic merges were "
                            "designed for (several fine-tuned models of one base).")
            suggestions.append("task_arithmetic, ties, dare_ties or widen: all made for models changed by similar "
                               f"amounts ({PAPER} also merges three fine-tuned 13B models with WIDEN)")
    alike, independent, other = [], [], []
    for p in whole.pairs:
        if p.cosine is None:
            continue
        if p.cosine >= 0.5:
            alike.append(p)
        elif abs(p.cosine) <= 0.1 and (p.sign_conflict or 0.0) >= 0.4:
            independent.append(p)
        else:
            other.append(p)
    for pairs, how in ((alike, "changed their weights alike"), (other, None),
                       (independent, "changed their weights independently of each other")):
        if not pairs:
            continue
        if how is None:  # neither alike nor unrelated: the figures, pair by pair
            findings += [f"models {p.models[0]} and {p.models[1]}: {_pair_figures([p], top_k)}." for p in pairs]
            continue
        listed = ", ".join(f"{p.models[0]} and {p.models[1]}" for p in pairs)
        unrelated = "; where both changed an element, summed deltas partly cancel" if pairs is independent else ""
        findings.append(f"models {listed} {how} ({_pair_figures(pairs, top_k, pairs is independent)}){unrelated}.")
    if independent and ratio is not None and ratio < GAP:
        suggestions.append("ties, dare_ties, breadcrumbs_ties: they elect one sign per element and drop the changes "
                           "that disagree with it")
    for m in whole.models:
        if m.delta_norm and m.unchanged >= 0.5:
            findings.append(f"{who[m.model]} left {_pct(m.unchanged)} of the weights exactly as in the base: a sparse "
                            "update (frozen modules, or an adapter merged into part of the weights).")
        standing = sorted(((g.model(m.model).relative_change or 0.0, g.name) for g in modules), reverse=True)
        if m.delta_norm and len(standing) > 1 and standing[0][0] >= 2 * standing[1][0]:
            (top, kind), (second, runner_up) = standing[:2]
            findings.append(f"{who[m.model]} changed its {kind} tensors most: ‖Δ‖/‖B‖ {_pct(top)}, at least twice "
                            f"as much as any other kind ({runner_up}: {_pct(second)}).")
    if not suggestions and whole.models and len(whole.models) == 1:
        m = whole.models[0]
        if m.relative_change is not None:
            findings.append(f"{who[1]}: ‖Δ‖/‖B‖ {_pct(m.relative_change)}, mean |Δ| {m.mean_abs_change:.3g}. For "
                            f"scale, {PAPER} reports parameter changes of about 0.0005–0.002 for fine-tuned and about "
                            "0.005 for continually pre-trained Qwen1.5 models, in weight units (compare the mean "
                            "|Δ|).")
    return Verdict(tuple(findings), tuple(suggestions), ratio, largest, smallest)
