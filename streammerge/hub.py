"""Model references: a local folder, or a Hugging Face Hub ID (``org/name`` or ``org/name@revision``) resolved
through the local Hugging Face cache with ``huggingface_hub`` (never our own cache code; only explaining a failure
reads the cache folder, below).

A local folder always wins. A Hub ID is resolved with ``huggingface_hub.snapshot_download``: only from the cache
(``local_files_only``) when ``--offline`` or ``HF_HUB_OFFLINE`` is set, else downloading what is missing, limited to
the files a merge reads (:data:`MERGE_FILES`: safetensors weights and their index, JSON configs and tokenizer files,
remote code, chat templates; never pickles). Before anything is planned the snapshot is checked complete: the
config, every shard the index names (a symlink into ``blobs/`` that dangles counts as missing), and no interrupted
download (``*.incomplete`` blobs); for a PEFT LoRA adapter (``MODEL+ADAPTER``), its ``adapter_model.safetensors``.
A miss names the missing files (a dangling link: its missing blob) and the command that fetches them.

``snapshot_download`` only says that it found nothing; then the repository's cache folder is read to say what is
wrong: a ref pointing to a commit with no snapshot, no such ref, a commit not cached (with the cached snapshots and
the command that fetches it), or, for an ID in neither place, that there is no such local folder either, with a
near local folder or cached ID (a typo). A short commit hash is expanded to the one cached snapshot that starts with
it (``snapshot_download`` takes only full hashes offline); several are refused, named.

The resolved snapshot folder carries the commit (``snapshots/<commit>``), so the plan's fingerprint, which holds
the input folders and files, changes when ``refs/main`` moves: a rerun then refuses to continue an interrupted
merge of the old commit (``--redo-changed`` or ``--restart`` say what to do). The manifest and the output's recipe
record ``org/name@commit``.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
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


def written_as_path(text: str) -> bool:
    """Whether a reference is written as a file system path (``./x``, ``../x``, ``/x``, ``~/x``), never a Hub ID."""
    return text.startswith(("./", "../", "/", "~", ".\\", "..\\")) or text in (".", "..")


def is_hub_id(ref: str | Path) -> bool:
    """Whether ``ref`` reads as a Hub ID and names no local folder (a local folder always wins)."""
    text = str(ref)
    return (not Path(text).expanduser().exists() and HUB_ID.match(text) is not None and not text.startswith(".")
            and not written_as_path(text))


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
    cache = _Cache(repo, Path(constants.HF_HUB_CACHE))
    revision = cache.full_commit(ref, revision)
    fetch = _fetch_command(repo, revision)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(MERGE_FILES),
                                                        local_files_only=local_only))
    except Exception as exc:  # noqa: BLE001 (huggingface_hub raises many kinds; each becomes one clear message)
        snapshot = getattr(exc, "snapshot_path", None)  # IncompleteSnapshotError: the cached tree lists more files
        if snapshot:
            _check_complete(ref, Path(snapshot), fetch)
            raise InputError(f"{ref}: the cached snapshot {snapshot} is incomplete ({exc}); fetch it again with: "
                             f"{fetch}") from None
        hub, no_repo = _hub_failure(exc, repo, local_only)
        problem = cache.problem(revision)
        if problem:
            raise InputError(f"{ref}: {problem}; {hub}") from None
        local = _near_local_folders(repo) if revision is None else []  # org/name@revision is no path
        local_hint = f" (did you mean the local folder {local[0]}?)" if local else ""
        cached = cache.near_repos()
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE}" + (
            f"; did you mean the cached {cached[0]}?)" if cached else ")")
        fetch_hint = "" if no_repo else f"; fetch it with: {fetch}"
        if local_only:
            raise InputError(f"{ref} is not a local folder{local_hint} and is not in {where}; {hub}{fetch_hint}") \
                from None
        if revision is None:
            raise InputError(f"{ref}: there is no local folder {ref}{local_hint}; as a Hub ID it is not in {where}, "
                             f"and {hub}{fetch_hint}") from None
        raise InputError(f"{ref}: it is not in {where}, and {hub}{fetch_hint}") from None
    _check_complete(ref, folder, fetch)
    return Resolved(folder, repo, folder.name)


#: a commit hash, full or shortened (as ``git log --oneline`` and the Hub's pages show it)
_COMMIT = re.compile(r"^[0-9a-f]{4,40}$")


class _Cache:
    """What the cache holds of one repository, to say why ``snapshot_download`` found nothing (it only says that it
    found nothing) and to expand a short commit hash, which ``snapshot_download`` does not."""

    def __init__(self, repo: str, root: Path) -> None:
        self.repo, self.root = repo, root
        self.storage = root / f"models--{repo.replace('/', '--')}"

    def snapshots(self) -> list[str]:
        """The cached commits, newest first."""
        folder = self.storage / "snapshots"
        if not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.is_dir()]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def ref(self, revision: str) -> str | None:
        try:
            return (self.storage / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            return None

    def listing(self, commits: list[str] | None = None) -> str:
        commits = self.snapshots() if commits is None else commits
        shown = ", ".join(commits[:3])
        return f"cached snapshots: {shown}" + (f" and {len(commits) - 3} more" if len(commits) > 3 else "")

    def full_commit(self, ref: str | Path, revision: str | None) -> str | None:
        """``revision``, or the one cached commit a short hash starts with; refuses a short hash several start
        with."""
        if revision is None or not _COMMIT.match(revision) or len(revision) == 40 or self.ref(revision):
            return revision
        matches = [c for c in self.snapshots() if c.startswith(revision)]
        if len(matches) > 1:
            raise InputError(f"{ref}: {len(matches)} cached snapshots of {self.repo} have a commit that starts with "
                             f"{revision!r} ({', '.join(matches)}); give more of the commit, e.g. "
                             f"{self.repo}@{matches[0]}")
        return matches[0] if matches else revision

    def problem(self, revision: str | None) -> str | None:
        """Why the cache has no snapshot for ``revision``, or None when the cache has nothing of the repository."""
        if not self.storage.is_dir():
            return None
        rev = revision or "main"
        snaps = self.snapshots()
        fetch = _fetch_command(self.repo, revision)
        if not snaps:
            return (f"the Hugging Face cache has {self.repo} ({self.storage}) but no snapshot of it; fetch it with: "
                    f"{fetch}")
        use = f"give a cached commit, e.g. {self.repo}@{snaps[0]}"
        commit = self.ref(rev)
        if commit is not None:
            return (f"refs/{rev} of {self.repo} in the Hugging Face cache points to commit {commit} whose snapshot is "
                    f"not in the cache ({self.listing()}); fetch that commit with: {_fetch_command(self.repo, commit)}"
                    f"; or {use}")
        if _COMMIT.match(rev) and len(rev) == 40:
            return (f"commit {rev} of {self.repo} is not in the Hugging Face cache ({self.listing()}); fetch it with: "
                    f"{fetch}; or {use}")
        if _COMMIT.match(rev):
            return (f"no cached snapshot of {self.repo} has a commit that starts with {rev!r}, and the cache has no "
                    f"ref {rev!r} ({self.listing()}); {use}; or fetch it with: {fetch}")
        return (f"the Hugging Face cache has snapshots of {self.repo} ({self.listing()}) but no ref {rev!r}; {use}; "
                f"or fetch it with: {fetch}")

    def near_repos(self) -> list[str]:
        """A cached repository whose ID is close to this one (a typo), if any."""
        if not self.root.is_dir():
            return []
        cached = [p.name[len("models--"):].replace("--", "/", 1) for p in self.root.glob("models--*") if p.is_dir()]
        return difflib.get_close_matches(self.repo, cached, n=1, cutoff=0.8)


def _near_local_folders(text: str) -> list[str]:
    """A local folder whose path is close to ``text`` (``models/chta`` for ``models/chat``), if any."""
    parent, name = text.split("/", 1)

    def close(word: str, where: Path) -> list[str]:
        try:
            names = [p.name for p in where.iterdir() if p.is_dir()]
        except OSError:
            return []
        return difflib.get_close_matches(word, names, n=1, cutoff=0.6)

    for folder in [parent] if Path(parent).is_dir() else close(parent, Path(".")):
        found = [name] if (Path(folder) / name).is_dir() else close(name, Path(folder))
        if found:
            return [f"{folder}/{found[0]}"]
    return []


def _hub_failure(exc: Exception, repo: str, local_only: bool) -> tuple[str, bool]:
    """What went wrong with the Hub, and whether it has no such repository (so no download can help)."""
    if local_only:
        return "offline, so nothing was downloaded", False
    cause = exc.__cause__ or exc  # LocalEntryNotFoundError wraps the connection error
    name = type(cause).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return (f"the Hub has no repository {repo} that you may read ({name}: {_first_line(cause)}; a private or "
                f"gated one needs `hf auth login`)"), True
    if name == "RevisionNotFoundError":
        return f"the Hub has no such revision of {repo} ({name}: {_first_line(cause)})", False
    if hasattr(cause, "response"):
        return f"the Hub answered with an error ({name}: {_first_line(cause)})", False
    return f"the Hub could not be reached ({name}: {_first_line(cause)})", False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


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
    elif not (folder / "model.safetensors").exists() and not (folder / "model.safetensors").is_symlink():
        missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    # a link into blobs/ whose blob is gone: an interrupted download, or a blob deleted from the cache
    dangling = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink()
                      and not p.exists() and any(fnmatch.fnmatch(p.name, pat) for pat in MERGE_FILES))
    missing = [f for f in missing if f not in dangling]
    blobs = folder.parent.parent / "blobs"
    partial = sorted(p.name for p in blobs.glob("*.incomplete")) if blobs.is_dir() else []
    if not (missing or dangling or partial):
        return
    what = []
    if missing:
        what.append(f"lacks {_some(missing)}; fetch it again with: {fetch}")
    if dangling:
        one = len(dangling) == 1
        m = HUB_ID.match(str(ref))
        repo = m.group("repo") if m else str(ref)
        what.append(f"lacks {_some(dangling)}: {'its link points' if one else 'their links point'} into blobs/ "
                    f"({dangling[0]} -> {os.readlink(folder / dangling[0])}) but "
                    f"{'the blob is' if one else 'the blobs are'} missing (an interrupted download, or a blob "
                    f"deleted from the cache); fetch {'it' if one else 'them'} with: hf download {repo} "
                    f"{' '.join(dangling)} --revision {folder.name}")
    if partial:
        what.append(f"has {len(partial)} interrupted download(s) in {blobs} ({_some(partial)}); resume with: "
                    f"{fetch}")
    raise InputError(f"{ref}: the cached snapshot {folder} " + "; and it ".join(what))


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
