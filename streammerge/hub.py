"""Model references: a local folder, or a Hugging Face Hub ID (``org/name`` or ``org/name@revision``) resolved
through the local Hugging Face cache with ``huggingface_hub`` (never our own cache code).

A local folder always wins. A Hub ID is resolved with ``huggingface_hub.snapshot_download``: only from the cache
(``local_files_only``) when ``--offline`` or ``HF_HUB_OFFLINE`` is set, else downloading what is missing, limited to
the files a merge reads (:data:`MERGE_FILES`: safetensors weights and their index, JSON configs and tokenizer files,
remote code, chat templates; never pickles). Before anything is planned the snapshot is checked complete: the
config, every shard the index names (a symlink into ``blobs/`` that dangles counts as missing), and no interrupted
download (``*.incomplete`` blobs); for a PEFT LoRA adapter (``MODEL+ADAPTER``), its ``adapter_model.safetensors``. A miss names the missing files and the command that fetches them.

The resolved snapshot folder carries the commit (``snapshots/<commit>``), so the plan's fingerprint, which holds
the input folders and files, changes when ``refs/main`` moves: a rerun then refuses to continue an interrupted
merge of the old commit (``--redo-changed`` or ``--restart`` say what to do). The manifest and the output's recipe
record ``org/name@commit``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: ``org/name`` or ``org/name@revision`` (a revision: a branch, tag or commit)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
#: what a merge reads from a repository (``snapshot_download``'s ``allow_patterns``)
MERGE_FILES = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.py", "*.jinja", "*.txt", "*.model",
               "*.tiktoken")


@dataclass(frozen=True)
class Resolved:
    """Where a reference's files are: ``folder``; for a Hub ID also its ``repo_id`` and the snapshot's ``commit``."""

    folder: Path
    repo_id: str | None = None
    commit: str | None = None

    @property
    def reference(self) -> str:
        """``org/name@commit`` for a Hub ID, the folder otherwise."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else str(self.folder)


def is_hub_id(ref: str | Path) -> bool:
    """Whether ``ref`` reads as a Hub ID and names no local folder (a local folder always wins)."""
    text = str(ref)
    return not Path(text).expanduser().exists() and HUB_ID.match(text) is not None and not text.startswith(".")


def resolve(ref: str | Path, offline: bool = False) -> Resolved:
    """The folder of ``ref`` (see the module docstring). Raises :class:`InputError` naming what is missing and how
    to fetch it."""
    if not is_hub_id(ref):
        return Resolved(Path(ref))
    m = HUB_ID.match(str(ref))
    assert m is not None
    repo, revision = m.group("repo"), m.group("revision")
    try:
        import huggingface_hub  # noqa: PLC0415 (only Hub IDs need it)
        from huggingface_hub import constants  # noqa: PLC0415
    except ImportError:
        raise InputError(f"{ref} is not a folder; to use it as a Hub ID install huggingface_hub") from None
    local_only = offline or bool(constants.HF_HUB_OFFLINE)
    fetch = _fetch_command(repo, revision)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(MERGE_FILES),
                                                        local_files_only=local_only))
    except Exception as exc:  # noqa: BLE001 (huggingface_hub raises many kinds; each becomes one clear message)
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if local_only:
            raise InputError(f"{ref} is not a local folder and is not in {where} (offline: nothing is downloaded); "
                             f"fetch it with: {fetch}") from None
        raise InputError(f"{ref}: could not get it from the Hub ({type(exc).__name__}: {exc}); if it is in "
                         f"{where}, add --offline; or fetch it with: {fetch}") from None
    _check_complete(ref, folder, fetch)
    return Resolved(folder, repo, folder.name)


def _fetch_command(repo: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo}{rev} --include " + " ".join(f"'{p}'" for p in MERGE_FILES)


def _check_complete(ref: str | Path, folder: Path, fetch: str) -> None:
    """Refuse a snapshot with missing files, dangling links or an interrupted download, naming them."""
    import json  # noqa: PLC0415

    missing = [] if (folder / "config.json").exists() else ["config.json"]
    index = folder / "model.safetensors.index.json"
    if missing and (folder / "adapter_config.json").exists():  # a PEFT adapter (MODEL+ADAPTER), not a model
        missing = [] if (folder / "adapter_model.safetensors").exists() else ["adapter_model.safetensors"]
    elif index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        except (OSError, ValueError):
            shards = []
            missing.append(index.name + " (unreadable)")
        missing += [s for s in shards if not (folder / s).exists()]
    elif not (folder / "model.safetensors").exists():
        missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    blobs = folder.parent.parent / "blobs"
    partial = sorted(p.name for p in blobs.glob("*.incomplete")) if blobs.is_dir() else []
    if missing or partial:
        what = []
        if missing:
            what.append(f"lacks {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5
                                                               else ""))
        if partial:
            what.append(f"has {len(partial)} interrupted download(s) ({partial[0]}, ...)")
        raise InputError(f"{ref}: the cached snapshot {folder} {' and '.join(what)}; fetch it again with: {fetch}")

