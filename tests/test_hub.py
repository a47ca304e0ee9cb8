"""Hub IDs (org/name, org/name@revision) resolved through a local Hugging Face cache laid out as huggingface_hub lays
it out (refs/, snapshots/<commit>/ of symlinks into blobs/), offline; incomplete snapshots refused naming the
missing files and the command that fetches them; the commit recorded, and a moved refs/main noticed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from streammerge import api
from streammerge.cli import main
from streammerge.examples import write_family

pytest.importorskip("huggingface_hub", reason="Hub IDs need huggingface_hub")


def cache_repo(cache: Path, repo: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """Put ``folder``'s files in ``cache`` as snapshot ``commit`` of ``repo``, with ``refs/<ref>`` naming it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


COMMITS = {"base": "a" * 40, "chat": "b" * 40, "multilingual": "c" * 40}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> tuple[Path, dict[str, Path]]:
    """A cache holding org/base, org/chat and org/multilingual; huggingface_hub pointed at it."""
    from huggingface_hub import constants

    fam = write_family(tmp_path / "fam", "tiny")
    cache = tmp_path / "hf-cache"
    snaps = {name: cache_repo(cache, f"org/{name}", fam[name], COMMITS[name]) for name in COMMITS}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "org/..." must not name a local folder
    return cache, snaps


def _merge(*extra: str):
    return CliRunner().invoke(main, ["merge", "--base", "org/base", "--model", "org/chat", "--model",
                                     "org/multilingual", "--offline", "-q", *extra])


def test_cached_hub_ids_merge_offline_and_are_recorded_with_their_commit(hub, tmp_path):
    cache, snaps = hub
    r = _merge("--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    manifest = json.loads((out / "streammerge-manifest.json").read_text())
    assert sorted(manifest["references"].values()) == sorted(f"org/{n}@{c}" for n, c in COMMITS.items())
    recipe = yaml.safe_load((out / "streammerge_recipe.yaml").read_text())
    assert recipe["base_model"] == f"org/base@{COMMITS['base']}"
    assert [m["model"] for m in recipe["models"]] == [f"org/chat@{COMMITS['chat']}",
                                                       f"org/multilingual@{COMMITS['multilingual']}"]
    card = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert card["base_model"] == ["org/base", "org/chat", "org/multilingual"]
    # the recipe reruns the same bytes, from the same commits
    r = CliRunner().invoke(main, ["merge", str(out / "streammerge_recipe.yaml"), "--out", str(tmp_path / "again"),
                                  "--offline", "-q"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_hf_hub_offline_in_the_environment_is_enough(hub, tmp_path):
    """mergekit 0.1.5 lists the repository over the network first and fails offline on a fully cached ID."""
    cache, _ = hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "streammerge", "merge", "--base", "org/base@main", "--model",
                           "org/chat", "--model", "org/multilingual", "--out", str(tmp_path / "out"), "-q"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_id_not_in_the_cache_names_the_command_that_fetches_it(hub, tmp_path):
    r = CliRunner().invoke(main, ["merge", "--base", "org/base", "--model", "org/chat", "--model", "org/missing",
                                  "--offline", "--out", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "org/missing is not a local folder and is not in the Hugging Face cache" in r.output
    assert "hf download org/missing --include '*.safetensors'" in r.output and not (tmp_path / "out").exists()


def test_a_dangling_shard_link_and_an_interrupted_download_are_refused(hub, tmp_path):
    cache, snaps = hub
    shard = snaps["chat"] / "model.safetensors"
    shard.resolve().unlink()  # the blob is gone: the link dangles
    r = _merge("--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "org/chat" in r.output and "lacks model.safetensors" in r.output
    assert "hf download org/chat" in r.output
    (snaps["multilingual"].parent.parent / "blobs" / "0123.incomplete").write_bytes(b"")
    r = _merge("--out", str(tmp_path / "out"))
    assert "org/multilingual" in r.output and "interrupted download" in r.output


def test_a_moved_ref_is_a_changed_input_for_an_interrupted_merge(hub, tmp_path, monkeypatch):
    """(A new commit whose files are the same blobs is the same input: the merge continues, as it should.)"""
    from helpers import interrupt_at_tensor

    cache, snaps = hub
    interrupt_at_tensor(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        api.merge("org/base", ["org/chat", "org/multilingual"], tmp_path / "out", offline=True)
    monkeypatch.undo()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    new = "d" * 40  # the repository moved on: refs/main names a new commit with other weights
    retrained = tmp_path / "retrained"
    shutil.copytree(snaps["chat"], retrained)  # the files themselves
    (retrained / "model.safetensors").write_bytes((snaps["multilingual"] / "model.safetensors").read_bytes())
    shutil.rmtree(cache / "models--org--chat" / "refs")
    cache_repo(cache, "org/chat", retrained, new)
    r = _merge("--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "changed" in r.output and "--redo-changed" in r.output
    r = _merge("--out", str(tmp_path / "out"), "--redo-changed")
    assert r.exit_code == 0, r.output
    refs = json.loads((tmp_path / "out" / "streammerge-manifest.json").read_text())["references"]
    assert f"org/chat@{new}" in refs.values()


def test_a_local_folder_wins_over_a_hub_id(hub, tmp_path):
    cache, snaps = hub
    shutil.copytree(snaps["base"], tmp_path / "org" / "base")  # ./org/base exists: it is the base
    plan = api.plan("org/base", ["org/chat", "org/multilingual"], offline=True)
    assert plan.recipe.base == Path("org/base") and str(plan.recipe.base) not in plan.recipe.hub_refs
