"""Third-party merge methods through the ``streammerge.methods`` entry point group (docs/methods.md).

Each test installs real plugins: a module and a ``*.dist-info`` folder (``METADATA``, ``entry_points.txt``) in a
folder of its own, put first on ``sys.path``, found by ``importlib.metadata`` as any installed distribution is. The
registry's plugin state is dropped when a plugin is installed and again when it is removed, and the teardown checks
that only built-ins are left, so no plugin leaks into other tests. The example plugin, its entry point and its test
are taken from docs/methods.md, so the page's code is what runs here.

* the documented plugin: listed with its origin (text and --json), merged through the CLI in a fresh interpreter
  and through the API at odd chunk sizes against a dense reference;
* a plugin named like a built-in: not imported, the built-in keeps the name, a warning names both origins;
* a broken plugin: ``streammerge methods`` still works and names it, asking for it is an error naming the
  distribution and the entry point, the other methods (and plugins) still merge;
* every other refusal (not a Method, name mismatch, bad name, @register, bad parameter kind, a name two plugins
  claim), and the registry back to the built-ins once a plugin is removed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from streammerge.cli import main
from streammerge.errors import MethodError
from streammerge.examples import write_family
from streammerge.methods import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    PluginWarning,
    all_methods,
    forget_plugins,
    get_method,
    method_origin,
    plugin_problems,
)

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "methods.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def guide_blocks() -> dict[str, str]:
    """docs/methods.md's code blocks that start with a ``# <file name>`` line, by that file name."""
    blocks = {}
    for m in FENCE.finditer(GUIDE.read_text(encoding="utf-8")):
        first, _, rest = m.group(2).partition("\n")
        if first.startswith("# ") and "." in first:
            blocks[first[2:].strip()] = rest
    return blocks


def guide_entry_points() -> dict[str, str]:
    """The ``[project.entry-points."streammerge.methods"]`` table of the guide's pyproject.toml, and its name and
    version."""
    text = guide_blocks()["pyproject.toml"]
    section = re.search(rf'^\[project\.entry-points\."{re.escape(ENTRY_POINT_GROUP)}"\]\n(.*?)(?:^\[|\Z)', text,
                        re.MULTILINE | re.DOTALL)
    assert section, f"docs/methods.md's pyproject.toml declares no [project.entry-points.\"{ENTRY_POINT_GROUP}\"]"
    points = dict(re.findall(r'^(\S+)\s*=\s*"([^"]+)"', section.group(1), re.MULTILINE))
    meta = dict(re.findall(r'^(name|version)\s*=\s*"([^"]+)"', text, re.MULTILINE))
    return {"__name__": meta["name"], "__version__": meta["version"], **points}


class Plugins:
    """Installs distributions with entry points into folders put first on ``sys.path``; :meth:`remove_all` undoes
    every install."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: list[Path] = []
        self.modules: set[str] = set()

    def install(self, distribution: str, version: str, files: dict[str, str], entry_points: dict[str, str]) -> Path:
        """Write ``files`` (relative path: text) and ``<distribution>-<version>.dist-info`` declaring
        ``entry_points`` (name: "module:Class") in the streammerge.methods group; returns the folder."""
        folder = self.root / f"site-{len(self.folders)}"
        info = folder / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
        for rel, text in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            self.modules.add(Path(rel).parts[0].removesuffix(".py"))
        sys.path.insert(0, str(folder))
        self.folders.append(folder)
        forget_plugins()
        return folder

    def install_guide_example(self) -> Path:
        points = guide_entry_points()
        name, version = points.pop("__name__"), points.pop("__version__")
        return self.install(name, version, {"normblend.py": guide_blocks()["normblend.py"]}, points)

    def remove_all(self) -> None:
        for folder in self.folders:
            sys.path.remove(str(folder))
        self.folders.clear()
        for name in [m for m in sys.modules if m.split(".")[0] in self.modules]:
            del sys.modules[name]
        forget_plugins()


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[Plugins]:
    p = Plugins(tmp_path / "plugins")
    yield p
    p.remove_all()
    assert {method_origin(name) for name in all_methods()} == {BUILTIN} and not plugin_problems()


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def method_module(class_name: str, name: str, extra: str = "", decorator: str = "") -> str:
    """A valid plugin module whose element-wise method returns the model (with ``extra`` class attributes)."""
    return (f"from streammerge.methods import Method, TensorMerge, register\n\n"
            f"class _Take(TensorMerge):\n"
            f"    def emit(self, r0, base, models):\n"
            f"        return models[0]\n\n"
            f"{decorator}\n"
            f"class {class_name}(Method):\n"
            f"    name = {name!r}\n"
            f"    summary = 'takes the model'\n"
            f"{extra}"
            f"    def start(self, task, params, n_models):\n"
            f"        return _Take()\n")


# --------------------------------------------------------------------------------------------- the guide's plugin


def test_the_guides_plugin_is_listed_with_its_origin(plugins):
    plugins.install_guide_example()
    listed = invoke("methods")
    assert listed.exit_code == 0 and listed.stderr == "", listed.output
    lines = listed.stdout.splitlines()
    assert ("normblend  (origin: streammerge-normblend 0.1.0; models besides the base: exactly 1; passes: 2 (float64 "
            "norms, then blend))") in lines
    assert "    t (float, default 0.5): weight of the rescaled model: 0 gives the base" in lines
    assert any(line.startswith("widen  (origin: builtin; models besides the base: 2 or more") for line in lines)
    as_json = invoke("methods", "--json")
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.stdout)
    origins = {m["name"]: m["origin"] for m in doc["methods"]}
    assert origins.pop("normblend") == "streammerge-normblend 0.1.0"
    assert set(origins.values()) == {BUILTIN} and set(origins) == set(all_methods()) - {"normblend"}
    normblend = next(m for m in doc["methods"] if m["name"] == "normblend")
    assert normblend["params"] == [{"name": "t", "kind": "float", "default": 0.5, "per_model": False,
                                    "help": "weight of the rescaled model: 0 gives the base"}]
    assert (normblend["min_models"], normblend["max_models"]) == (1, 1) and doc["plugin_problems"] == []
    assert method_origin("normblend") == "streammerge-normblend 0.1.0" and method_origin("widen") == BUILTIN


def test_the_guides_test_passes_with_the_guides_plugin(plugins, tmp_path):
    """docs/methods.md's test block: the dense reference, bit-identical output at chunk sizes 3 and 7."""
    plugins.install_guide_example()
    namespace: dict[str, Any] = {}
    exec(compile(guide_blocks()["tests/test_normblend.py"], "docs/methods.md", "exec"), namespace)  # noqa: S102
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0](tmp_path)


def test_a_fresh_interpreter_finds_the_plugin_and_merges_with_it(plugins, tmp_path):
    """No registry reset, no sys.path edit: the plugin's folder on PYTHONPATH, as an installed package is found."""
    import torch

    site = plugins.install_guide_example()
    fam = write_family(tmp_path / "fam", "tiny-llama", dtype="f32")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}

    def run(*args: Any) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True,
                           env=env, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    listed = json.loads(run("methods", "--json").stdout)
    assert {m["name"]: m["origin"] for m in listed["methods"]}["normblend"] == "streammerge-normblend 0.1.0"
    out = tmp_path / "merged"
    run("merge", "--base", fam["base"], "--model", fam["chat"], "--method", "normblend", "--param", "t=0.3",
        "--chunk-rows", "5", "--out", out, "-q")
    namespace: dict[str, Any] = {}
    exec(compile(guide_blocks()["tests/test_normblend.py"], "docs/methods.md", "exec"), namespace)  # noqa: S102
    reference = namespace["normblend_reference"]
    got = load_file(out / "model.safetensors")
    base, chat = (load_file(fam[k] / "model.safetensors") for k in ("base", "chat"))
    assert set(got) == set(base)
    for name, b in base.items():
        torch.testing.assert_close(got[name], reference(0.3, b, chat[name]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------------------------- refusals


def test_a_plugin_named_like_a_builtin_is_not_imported_and_the_builtin_keeps_the_name(plugins):
    plugins.install("streammerge-slerp2", "2.0", {"slerp_again.py": method_module("Slerp", "slerp")},
                    {"slerp": "slerp_again:Slerp"})
    listed = invoke("methods")
    assert listed.exit_code == 0, listed.output
    assert any(line.startswith("slerp  (origin: builtin;") for line in listed.stdout.splitlines())
    assert ("warning: plugin method 'slerp' from streammerge-slerp2 2.0 (entry point slerp = slerp_again:Slerp in "
            f"group {ENTRY_POINT_GROUP}) was not loaded: the name is taken by the built-in method 'slerp' (builtin), "
            "which a plugin may not replace: rename the plugin's method") in listed.stderr
    assert "slerp_again" not in sys.modules
    with pytest.warns(PluginWarning, match=r"streammerge-slerp2 2\.0 .*; the built-in 'slerp' is used"):
        method = get_method("slerp")
    assert type(method).__module__ == "streammerge.methods.slerp" and method_origin("slerp") == BUILTIN


@pytest.fixture
def fam(tmp_path: Path) -> dict[str, Path]:
    return write_family(tmp_path / "fam", "tiny", dtype="bf16")


def test_a_broken_plugin_is_named_and_everything_else_still_works(plugins, fam, tmp_path):
    plugins.install("streammerge-broken", "0.3.1",
                    {"broken_plugin/__init__.py": "import streammerge_no_such_dependency\n"},
                    {"broken": "broken_plugin:Broken"})
    plugins.install_guide_example()
    problem = ("plugin method 'broken' from streammerge-broken 0.3.1 (entry point broken = broken_plugin:Broken in "
               f"group {ENTRY_POINT_GROUP}) was not loaded: importing or instantiating it raised ModuleNotFoundError: "
               "No module named 'streammerge_no_such_dependency'")

    listed = invoke("methods")
    assert listed.exit_code == 0, listed.output
    assert listed.stderr == f"warning: {problem}\n"
    names = [line.split()[0] for line in listed.stdout.splitlines() if line and not line.startswith(" ")]
    assert names == sorted(all_methods()) and "normblend" in names and "broken" not in names
    doc = json.loads(invoke("methods", "--json").stdout)
    assert doc["plugin_problems"] == [{"name": "broken", "entry_point": "broken_plugin:Broken",
                                       "distribution": "streammerge-broken 0.3.1",
                                       "reason": problem.split("was not loaded: ", 1)[1]}]

    out = tmp_path / "out"
    asked = invoke("merge", "--base", fam["base"], "--model", fam["chat"], "--method", "broken", "--out", out, "-q")
    assert asked.exit_code == 1 and problem in asked.stderr, asked.output
    assert "fix or uninstall the plugin" in asked.stderr and not out.exists()
    with pytest.raises(MethodError, match="streammerge-broken 0.3.1"):
        get_method("Broken")

    for method in ("nearswap", "normblend"):
        ok = invoke("merge", "--base", fam["base"], "--model", fam["chat"], "--method", method,
                    "--out", tmp_path / method, "-q")
        assert ok.exit_code == 0, ok.output


REFUSALS = {
    "not a Method subclass": ({"odd.py": "VALUE = 3\n"}, {"odd": "odd:VALUE"},
                              "odd:VALUE is 3, not a subclass of streammerge.methods.Method"),
    "the Method base class itself": ({"odd.py": "from streammerge.methods import Method\n"}, {"odd": "odd:Method"},
                                     "not a subclass of streammerge.methods.Method"),
    "entry point and class names differ": ({"odd.py": method_module("Odd", "other")}, {"odd": "odd:Odd"},
                                           "the entry point is named 'odd' but the class's name is 'other'"),
    "decorated with @register": ({"odd.py": method_module("Odd", "odd", decorator="@register")}, {"odd": "odd:Odd"},
                                 "raised RuntimeError: @register is for streammerge's built-in methods, not odd.Odd"),
    "a parameter of another kind": (
        {"odd.py": method_module("Odd", "odd", extra="    from streammerge.methods import ParamSpec\n"
                                                    "    params = (ParamSpec('x', list, [], 'items'),)\n")},
        {"odd": "odd:Odd"}, "parameter 'x' has kind <class 'list'>; the kinds are float, int, bool and str"),
    "an unknown base policy": ({"odd.py": method_module("Odd", "odd", extra="    base_policy = 'sometimes'\n")},
                               {"odd": "odd:Odd"}, "base_policy 'sometimes' is not one of required, none, optional"),
    "fails to instantiate": (
        {"odd.py": method_module("Odd", "odd", extra="    def __init__(self):\n        raise ValueError('no GPU')\n")},
        {"odd": "odd:Odd"}, "importing or instantiating it raised ValueError: no GPU"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_an_invalid_plugin_is_refused_with_the_reason(case, plugins):
    files, points, reason = REFUSALS[case]
    plugins.install("streammerge-odd", "1.0", files, points)
    (problem,) = plugin_problems()
    assert (problem.name, problem.distribution) == ("odd", "streammerge-odd 1.0")
    assert reason in problem.reason, problem.reason
    assert "odd" not in all_methods() and "nearswap" in all_methods()
    with pytest.raises(MethodError) as err:
        get_method("odd")
    assert str(problem) in str(err.value) and "entry point odd = " in str(err.value)


def test_a_name_that_is_not_a_method_name_is_refused(plugins):
    plugins.install("streammerge-odd", "1.0", {"odd.py": method_module("Odd", "odd")}, {"Odd-Name": "odd:Odd"})
    (problem,) = plugin_problems()
    assert problem.name == "Odd-Name" and "its name is not a method name" in problem.reason
    assert "odd" not in sys.modules and "odd" not in all_methods()


def test_a_name_two_plugins_claim_goes_to_neither(plugins):
    for dist, module in (("streammerge-a", "twin_a"), ("streammerge-b", "twin_b")):
        plugins.install(dist, "1.0", {f"{module}.py": method_module("Twin", "twin")}, {"twin": f"{module}:Twin"})
    problems = plugin_problems()
    assert sorted(p.distribution for p in problems) == ["streammerge-a 1.0", "streammerge-b 1.0"]
    assert all("2 distributions claim the name (" in p.reason and "so none gets it" in p.reason for p in problems)
    with pytest.raises(MethodError, match="streammerge-a 1.0.*streammerge-b 1.0|streammerge-b 1.0.*streammerge-a 1.0"):
        get_method("twin")
    assert "twin" not in all_methods()


def test_the_registry_is_back_to_the_builtins_once_a_plugin_is_removed(plugins):
    before = all_methods()
    plugins.install_guide_example()
    assert set(all_methods()) == set(before) | {"normblend"}
    plugins.remove_all()
    assert all_methods() == before and not plugin_problems()
    assert {method_origin(name) for name in before} == {BUILTIN}
    with pytest.raises(MethodError, match="unknown merge method 'normblend'"):
        get_method("normblend")
    assert "normblend" not in invoke("methods").stdout


def test_a_plugins_version_is_part_of_the_engine_a_resume_must_match(plugins, fam, tmp_path):
    """The plan's engine document names the plugin's distribution and version (a built-in adds no key), so a run
    interrupted under one plugin version is refused by name under another."""
    from streammerge import api
    from streammerge.fingerprint import engine_changes

    plugins.install_guide_example()
    doc = api.plan(fam["base"], fam["chat"], tmp_path / "out", method="normblend").fingerprint_doc
    assert doc["engine"]["method_plugin"] == "streammerge-normblend 0.1.0"
    newer = {"engine": {**doc["engine"], "method_plugin": "streammerge-normblend 0.2.0"}}
    assert engine_changes(doc, newer) == ["method plugin: streammerge-normblend 0.1.0 -> streammerge-normblend 0.2.0"]
    builtin = api.plan(fam["base"], fam["chat"], tmp_path / "out", method="nearswap").fingerprint_doc
    assert "method_plugin" not in builtin["engine"]
