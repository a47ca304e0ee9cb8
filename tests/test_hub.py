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
    assert r.exit_code == 1 and "org/chat" in r.output and "lacks model.safetensors: its link points into blobs/ " \
        "(model.safetensors -> ../../blobs/" in r.output
    assert "but the blob is missing (an interrupted download, or a blob deleted from the cache); fetch it with: " \
        f"hf download org/chat model.safetensors --revision {COMMITS['chat']}" in r.output
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


def _inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


def test_inspect_resolves_hub_ids_as_merge_does(hub, monkeypatch):
    """inspect ORG/NAME and inspect BASE MODEL ... with IDs: offline with --offline or HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    cache, snaps = hub
    r = _inspect("org/base", "--offline")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("org/base: ") and f"({snaps['base']})" in r.output and "parameters" in r.output
    info = api.inspect("org/chat@main", offline=True)
    assert info["folder"] == str(snaps["chat"]) and info["hub_id"] == "org/chat@main"
    r = _inspect("org/base", "org/chat", "org/multilingual", "--offline")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("base org/base and 2 model(s): ")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the environment alone is enough
    r = _inspect("--json", "org/chat")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["folder"] == str(snaps["chat"])
    r = _inspect("org/missing")
    assert r.exit_code == 1 and "org/missing is not a local folder and is not in the Hugging Face cache" in r.output
    assert "download it first" not in r.output and "hf download org/missing --include" in r.output


def _hub_error(r) -> str:
    assert r.exit_code == 1, r.output
    return " ".join(r.output.split())  # click wraps nothing, but keep the assertions independent of line breaks


def test_a_moved_or_missing_ref_is_named_as_such(hub):
    cache, snaps = hub
    root = cache / "models--org--chat"
    moved = "e" * 40
    (root / "refs" / "main").write_text(moved)  # refs/main moved on; its snapshot was never fetched
    out = _hub_error(_inspect("org/chat", "--offline"))
    assert (f"org/chat: refs/main of org/chat in the Hugging Face cache points to commit {moved} whose snapshot is "
            f"not in the cache (cached snapshots: {COMMITS['chat']}); fetch that commit with: hf download org/chat "
            f"--revision {moved} --include") in out
    assert f"or give a cached commit, e.g. org/chat@{COMMITS['chat']}; offline, so nothing was downloaded" in out
    assert "is not a local folder" not in out
    (root / "refs" / "main").unlink()  # no refs/main at all
    out = _hub_error(_inspect("org/chat", "--offline"))
    assert (f"org/chat: the Hugging Face cache has snapshots of org/chat (cached snapshots: {COMMITS['chat']}) but "
            f"no ref 'main'; give a cached commit, e.g. org/chat@{COMMITS['chat']}; or fetch it with: hf download "
            "org/chat --include") in out
    out = _hub_error(_inspect("org/chat@dev", "--offline"))  # a branch the cache does not know
    assert "but no ref 'dev'" in out and "hf download org/chat --revision dev --include" in out
    (root / "refs" / "dev").write_text(COMMITS["chat"])  # one it knows
    assert api.inspect("org/chat@dev", offline=True)["folder"] == str(snaps["chat"])
    out = _hub_error(_inspect("org/chat@" + "f" * 40, "--offline"))  # a full commit that is not cached
    assert f"commit {'f' * 40} of org/chat is not in the Hugging Face cache (cached snapshots: {COMMITS['chat']})" \
        in out
    shutil.rmtree(root / "snapshots")
    out = _hub_error(_inspect("org/chat@dev", "--offline"))
    assert "the Hugging Face cache has org/chat" in out and "but no snapshot of it; fetch it with: hf download " \
        "org/chat --revision dev --include" in out


def test_a_short_commit_is_resolved_when_one_cached_snapshot_starts_with_it(hub, tmp_path):
    cache, snaps = hub
    assert api.inspect("org/chat@bbbbbbb", offline=True)["folder"] == str(snaps["chat"])
    r = CliRunner().invoke(main, ["merge", "--base", "org/base@aaaaaaaa", "--model", "org/chat@bbbbbbb", "--model",
                                  "org/multilingual", "--offline", "-q", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    refs = json.loads((tmp_path / "out" / "streammerge-manifest.json").read_text())["references"]
    assert f"org/base@{COMMITS['base']}" in refs.values() and f"org/chat@{COMMITS['chat']}" in refs.values()
    other = "bbbbbbb" + "1" * 33  # a second cached commit with the same first 7 characters
    cache_repo(cache, "org/chat", tmp_path / "fam" / "chat", other, ref="other")
    out = _hub_error(_inspect("org/chat@bbbbbbb", "--offline"))
    assert "org/chat@bbbbbbb: 2 cached snapshots of org/chat have a commit that starts with 'bbbbbbb' (" in out
    assert COMMITS["chat"] in out and other in out and "give more of the commit" in out
    assert api.inspect("org/chat@bbbbbbb1", offline=True)["folder"] == str(cache / "models--org--chat" / "snapshots"
                                                                           / other)
    out = _hub_error(_inspect("org/chat@abcdef1", "--offline"))
    assert "no cached snapshot of org/chat has a commit that starts with 'abcdef1', and the cache has no ref " \
           "'abcdef1' (cached snapshots: " in out and "hf download org/chat --revision abcdef1" in out


def test_a_dangling_config_link_names_its_blob_and_the_fetch(hub, tmp_path):
    cache, snaps = hub
    (snaps["base"] / "config.json").resolve().unlink()
    out = _hub_error(_inspect("org/base", "--offline"))
    assert f"the cached snapshot {snaps['base']} lacks config.json: its link points into blobs/" in out
    assert f"fetch it with: hf download org/base config.json --revision {COMMITS['base']}" in out


class RepositoryNotFoundError(Exception):
    """Stands for huggingface_hub's (which needs an HTTP response to be made)."""


class ConnectError(Exception):
    """Stands for httpx's, which huggingface_hub wraps in a LocalEntryNotFoundError."""


def _hub_fails_with(monkeypatch, error: Exception) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)


def test_a_mistyped_local_path_online_says_there_is_no_such_folder_and_the_nearest_one(hub, tmp_path,
                                                                                         monkeypatch):
    cache, snaps = hub
    shutil.copytree(snaps["base"], tmp_path / "X" / "base")
    _hub_fails_with(monkeypatch, RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found for url"))
    out = _hub_error(_inspect("X/bse"))
    assert "X/bse: there is no local folder X/bse (did you mean the local folder X/base?); as a Hub ID it is not " \
           "in the Hugging Face cache" in out
    assert "and the Hub has no repository X/bse that you may read (RepositoryNotFoundError: 404 Client Error.;" in out
    assert "hf download" not in out  # no download can help
    shutil.copytree(snaps["base"], tmp_path / "models" / "base")
    r = CliRunner().invoke(main, ["plan", "--base", "modles/base", "--model", str(snaps["chat"]), "--model",
                                  str(snaps["multilingual"])])
    out = _hub_error(r)  # the folder above mistyped: as merge, plan and analyze resolve it
    assert "modles/base: there is no local folder modles/base (did you mean the local folder models/base?)" in out
    try:
        raise LocalEntryNotFoundError("Got: ConnectError") from ConnectError("[Errno -2] Name or service not known")
    except LocalEntryNotFoundError as exc:
        _hub_fails_with(monkeypatch, exc)
    out = _hub_error(_inspect("X/bse"))
    assert "there is no local folder X/bse (did you mean the local folder X/base?)" in out
    assert "and the Hub could not be reached (ConnectError: [Errno -2] Name or service not known); fetch it with: " \
           "hf download X/bse --include" in out
    out = _hub_error(_inspect("org/bsae"))  # a mistyped Hub ID: the cached one is named
    assert f"is not in the Hugging Face cache ({cache}; did you mean the cached org/base?), and the Hub could" in out


class LocalEntryNotFoundError(Exception):
    """Stands for huggingface_hub's."""


def test_a_snapshot_huggingface_hub_finds_incomplete_is_named_as_such_not_as_absent(hub):
    """huggingface_hub (with its cached tree listing, written by a real download) refuses an incomplete snapshot
    itself: the message still names the snapshot and what it lacks, not "not in the Hugging Face cache"."""
    tree = pytest.importorskip("huggingface_hub._tree_cache")
    cache, snaps = hub
    entry = tree.TreeCacheEntry(size=1, blob_id="0", lfs_sha256=None, lfs_size=None, xet_hash=None)
    listing = {f.name: entry for f in snaps["chat"].iterdir()} | {"extra.json": entry}
    tree.write_tree_cache(str(cache / "models--org--chat"), COMMITS["chat"], listing)
    out = _hub_error(_inspect("org/chat", "--offline"))
    assert f"org/chat: the cached snapshot {snaps['chat']} is incomplete (" in out and "extra.json" in out
    assert "hf download org/chat --include" in out and "not in the Hugging Face cache" not in out
    (snaps["chat"] / "model.safetensors").resolve().unlink()
    out = _hub_error(_inspect("org/chat", "--offline"))
    assert "lacks model.safetensors: its link points into blobs/" in out
