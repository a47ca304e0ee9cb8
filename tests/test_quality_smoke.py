"""bench/quality (a miniature of the WIDEN paper's FT + PT experiment) end to end in its smoke mode.

One run of ``bench/quality/run.py --smoke`` into a temporary folder (under two minutes on two cores): the files
it writes, a row per method of ``streammerge methods``, finite scores, and what the tiny training reliably does
(the FT variant learns the answers' format, the PT variant the new language, PT moves further than FT). Exact match
itself is not asserted: the smoke-sized FT variant gets none right, so its answers' cross-entropy is used instead.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "quality" / "run.py"
MISSING = [m for m in ("transformers", "matplotlib", "safetensors") if importlib.util.find_spec(m) is None]
CLI = Path(sys.executable).parent / "streammerge"
CLI_PATH = str(CLI) if CLI.exists() else shutil.which("streammerge")
HAS_DATA = Path("/usr/share/doc").is_dir() and any(Path("/usr/share/locale").glob("*/LC_MESSAGES/*.mo"))

pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"bench/quality needs {', '.join(MISSING)} (pip install -e '.[test]')"),
    pytest.mark.skipif(CLI_PATH is None, reason="the streammerge command is not installed (pip install -e .)"),
    pytest.mark.skipif(not HAS_DATA, reason="bench/quality reads /usr/share/doc and /usr/share/locale/*/LC_MESSAGES"),
]

CORE = ("widen", "task_arithmetic", "ties", "dare_ties", "linear", "slerp")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the smoke mode once; the parsed JSON, the Markdown and the results folder."""
    tmp = tmp_path_factory.mktemp("quality")
    results = tmp / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work", str(tmp / "work"), "--results",
                           str(results), "--streammerge", CLI_PATH], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = results.glob("*-quality-smoke.json")
    data = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md").read_text()
    return {"data": data, "md": md, "results": results, "stem": json_path.stem, "work": tmp / "work"}


def methods() -> list[str]:
    text = subprocess.run([CLI_PATH, "methods"], capture_output=True, text=True, check=True).stdout
    return [m.group(1) for m in re.finditer(r"^(\w+)\s+\(origin:", text, re.M)]


def rows(data: dict) -> dict[str, dict]:
    return {r["label"]: r for r in data["rows"]}


def test_files_written(smoke: dict) -> None:
    results, stem, data = smoke["results"], smoke["stem"], smoke["data"]
    assert stem.endswith("-quality-smoke") and re.match(r"\d{8}T\d{6}Z-", stem)
    png = (results / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    for seed in range(data["seeds"]):
        change = data["relative_change"][str(seed)]
        assert change["source"] == "streammerge analyze", change.get("error")
        analysis = json.loads((results / change["json"]).read_text())
        assert len(analysis["model"]["models"]) == 2
        assert (results / change["plot"]).read_bytes().startswith(b"\x89PNG")
    for name in ("base", "seed0/ft", "seed0/pt", "seed1/ft", "seed1/pt"):
        folder = smoke["work"] / name
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer_config.json").is_file()


def test_a_row_per_method(smoke: dict) -> None:
    data, md = smoke["data"], smoke["md"]
    names = methods()
    assert set(names) >= set(CORE)
    merged = {r["method"] for r in data["rows"] if r["kind"] == "merge"}
    assert merged == set(names)
    for name in [*names, "**base**", "**FT**", "**PT**"]:
        assert re.search(rf"^\| {re.escape(name)}(?: \(| \|)", md, re.M), f"no table row for {name}"
    by_label = rows(data)
    for name in CORE:  # these merge any base + two models: every seed must have worked
        assert by_label[name]["summary"]["seeds_ok"] == data["seeds"], by_label[name]["per_seed"]
    for r in data["rows"]:
        for result in r["per_seed"].values():
            assert "error" in result or "ft_exact_match" in result
            if "error" in result:  # a failure is the CLI's own message, shown in the table
                assert result["error"].startswith("exit ") and r["label"] in md


def test_scores_finite(smoke: dict) -> None:
    data = smoke["data"]
    assert data["seeds"] >= 2
    for r in data["rows"]:
        for result in r["per_seed"].values():
            if "error" in result:
                continue
            assert 0.0 <= result["ft_exact_match"] <= 1.0
            for key in ("ft_answer_bits", "new_bpb", "en_bpb"):
                assert math.isfinite(result[key]) and 0.0 < result[key] < 20.0, (r["label"], key, result[key])


def test_training_did_what_it_should(smoke: dict) -> None:
    """Reliable at smoke size (margins of several bits): FT lowers the answers' cross-entropy, PT the new
    language's, PT moves the weights further than FT, and a seed changes the variants."""
    data = smoke["data"]
    by_label = rows(data)
    base = by_label["base"]["per_seed"]["0"]
    for seed in map(str, range(data["seeds"])):
        ft, pt = by_label["FT"]["per_seed"][seed], by_label["PT"]["per_seed"][seed]
        assert ft["ft_answer_bits"] < base["ft_answer_bits"] - 1.0
        assert pt["new_bpb"] < base["new_bpb"] - 1.0
        change = data["relative_change"][seed]
        assert 0 < change["ft"] < change["pt"]
    ft_runs = by_label["FT"]["per_seed"]
    assert ft_runs["0"]["ft_answer_bits"] != ft_runs["1"]["ft_answer_bits"]
    # task arithmetic adds both deltas in full: it must carry some of the PT variant's language
    ta = by_label["task_arithmetic"]["summary"]
    assert ta["new_bpb"]["mean"] < base["new_bpb"] - 0.5
