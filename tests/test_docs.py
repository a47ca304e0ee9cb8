"""The user-facing documentation stays self-contained and in step with the code.

* nothing the project ships (README.md, docs/, streammerge/**/*.py) points at ``shared/`` files outside it;
* every docs/*.md path or relative link in README.md, in docs/ and in ``streammerge methods`` exists;
* docs/widen.md documents exactly the WIDEN parameters the method declares, with their defaults;
* the README says how to install torch CPU-only and with CUDA, pins one version everywhere, and states the range
  that pyproject.toml allows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from streammerge.cli import main
from streammerge.methods import all_methods

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
WIDEN_DOC = DOCS / "widen.md"

#: a path into the shared folder beside the checkout (``shared/WIDEN.md``, ``/work/shared/DESIGN.md``, ...), and the
#: contract files that live there, however they are cited
OUTSIDE = re.compile(r"\bshared/|\b(?:WIDEN|DESIGN|PEERS)\.md\b")
#: a docs/*.md path as text (``docs/widen.md``, ``./docs/widen.md#anchor``)
DOCS_PATH = re.compile(r"(?<![\w/.-])(?:\./)?(docs/[\w./-]*?\.md)\b")
#: the target of a markdown link or image
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def shipped_files() -> list[Path]:
    files = [README, *sorted(p for p in DOCS.rglob("*") if p.is_file()),
             *sorted((ROOT / "streammerge").rglob("*.py"))]
    return [p for p in files if "__pycache__" not in p.parts]


def methods_output() -> str:
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    return result.output


def relative_targets(text: str, base: Path) -> list[tuple[str, Path]]:
    """(as written, resolved path) of every docs/*.md path and every relative markdown link in ``text``."""
    found = []
    for m in DOCS_PATH.finditer(text):
        found.append((m.group(1), ROOT / m.group(1)))
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        found.append((target, base / target.split("#", 1)[0]))
    return found


# --------------------------------------------------------------------------------------------- no shared/ paths


def test_docs_folder_exists() -> None:
    assert WIDEN_DOC.is_file(), "docs/widen.md is missing"


@pytest.mark.parametrize("path", shipped_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_project(path: Path) -> None:
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "files users never get are cited:\n" + "\n".join(hits)


def test_methods_output_cites_no_shared_file() -> None:
    out = methods_output()
    assert not OUTSIDE.search(out), out


# --------------------------------------------------------------------------------------------- links that exist


def test_readme_links_exist() -> None:
    text = README.read_text(encoding="utf-8")
    targets = relative_targets(text, ROOT)
    assert any(shown.startswith("docs/widen.md") for shown, _ in targets), "README.md does not point at docs/widen.md"
    missing = [shown for shown, path in targets if not path.exists()]
    assert not missing, f"README.md points at files that do not exist: {missing}"


def test_docs_links_exist() -> None:
    missing = []
    for doc in sorted(DOCS.rglob("*.md")):
        for shown, path in relative_targets(doc.read_text(encoding="utf-8"), doc.parent):
            if not path.exists():
                missing.append(f"{doc.relative_to(ROOT)}: {shown}")
    assert not missing, f"docs point at files that do not exist: {missing}"


def test_methods_output_links_exist() -> None:
    out = methods_output()
    widen_reference = next(line for line in out.splitlines() if line.strip().startswith("reference:")
                           and "2408.03092" in line)
    assert "docs/widen.md" in widen_reference, widen_reference
    assert "docs/widen.md" in all_methods()["widen"].reference
    missing = [shown for shown, path in relative_targets(out, ROOT) if not path.exists()]
    assert not missing, f"`streammerge methods` points at files that do not exist: {missing}"


# --------------------------------------------------------------------------------------------- WIDEN parameters


def parameter_rows(text: str) -> dict[str, str]:
    """The rows of docs/widen.md's parameter table (header ``| parameter | ...``), by the name in the first cell."""
    rows: dict[str, str] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| parameter |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            first = line.strip("|").split("|")[0].strip()
            if set(first) <= set("-: "):
                continue  # the separator row
            rows[first.strip("`")] = line
    return rows


def test_widen_doc_names_every_parameter_and_its_default() -> None:
    text = WIDEN_DOC.read_text(encoding="utf-8")
    params = all_methods()["widen"].params
    assert params, "the widen method declares no parameters"
    rows = parameter_rows(text)
    assert set(rows) == {p.name for p in params}, (
        f"docs/widen.md's parameter table lists {sorted(rows)}, the code declares {sorted(p.name for p in params)}")
    for p in params:
        assert f"`{p.name}`" in text
        shown = {str(p.default), str(p.default).lower()}
        row = rows[p.name]
        assert any(re.search(rf"(?<![\w.]){re.escape(v)}(?![\w.])", row) for v in shown), (
            f"docs/widen.md gives no default {p.default!r} for {p.name}: {row}")


def test_widen_doc_cites_the_paper() -> None:
    text = WIDEN_DOC.read_text(encoding="utf-8")
    assert "2408.03092" in text
    assert "Weight Disentanglement" in text


# --------------------------------------------------------------------------------------------- torch install


def torch_requirement() -> str:
    """pyproject.toml's torch requirement, e.g. ``torch>=2.1``."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r"""["'](torch\s*[^"';]*)["']""", text)
    assert m, "pyproject.toml has no torch requirement"
    return m.group(1).replace(" ", "")


def test_readme_torch_install_lines() -> None:
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if "pip install torch" in line]
    cpu = [line for line in lines if re.search(rf"pip install torch==[\w.]+ --index-url {re.escape(CPU_INDEX)}(\s|$)",
                                               line)]
    assert cpu, f"README.md has no CPU-only torch line (--index-url {CPU_INDEX})"
    cuda = [line for line in lines
            if re.search(r"download\.pytorch\.org/whl/cu1\d+", line)
            or ("CUDA" in line and "--index-url" not in line)]
    assert cuda, "README.md has no torch line for CUDA (the PyPI wheel or a cu12x index)"


def test_readme_torch_versions_agree() -> None:
    text = README.read_text(encoding="utf-8")
    pins = set(re.findall(r"pip install torch==([\w.]+)", text))
    assert len(pins) == 1, f"README.md pins several torch versions: {sorted(pins)}"
    pin = pins.pop()
    requirement = torch_requirement()
    spec = SpecifierSet(requirement[len("torch"):])
    assert Version(pin) in spec, f"README.md pins torch {pin}, outside pyproject.toml's {requirement}"
    assert requirement in text.replace(" ", ""), f"README.md does not state the range pyproject.toml allows ({requirement})"
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        ci_pins = set(re.findall(r"torch==([\w.]+)", ci.read_text(encoding="utf-8")))
        assert ci_pins <= {pin}, f"CI installs torch {sorted(ci_pins)}, README.md says {pin}"
        assert re.search(rf"tests?\s+(?:only\s+)?{re.escape(pin)}", text), \
            f"README.md does not say that CI tests torch {pin}"


def test_a_test_run_keeps_only_the_temporary_folders_of_failed_tests(pytestconfig):
    """A full run writes about 240 MB of models and merges under pytest's temporary folder; only the folders of
    failed tests are kept for inspection."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
