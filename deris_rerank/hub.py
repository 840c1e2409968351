"""`hf://OWNER/REPO/PATH` and `hf://OWNER/REPO@REVISION/PATH`: files and folders of Hugging Face
Hub model repositories, fetched into (or found in) huggingface_hub's own cache, which its
environment variables govern (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN`,
`HF_ENDPOINT`). huggingface_hub (the `hub` extra) is imported only when such a path is given;
nothing is downloaded otherwise. `model_files` decides which files a model needs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union
from urllib.parse import unquote

from .errors import CheckpointError, install_hint

PathLike = Union[str, os.PathLike]

HUB_PREFIX = "hf://"
HUB_FORMS = "hf://OWNER/REPO/PATH or hf://OWNER/REPO@REVISION/PATH"
HUB_INSTALL = install_hint("hub", "huggingface_hub")
# hf:// URIs of other kinds of repository start with these (huggingface_hub's type prefixes).
_OTHER_REPO_KINDS = frozenset({"datasets", "spaces", "buckets", "kernels"})
# OWNER/REPO, then optionally @REVISION (refs/pr/N and refs/convert/NAME keep their slashes;
# any other revision with a slash is written %2F), then /PATH.
_HUB_PATH = re.compile(r"(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>refs/pr/\d+|refs/convert/[^/]+|[^/]+))?(?:/(?P<path>.*))?")


@dataclass(frozen=True)
class HubPath:
    """An hf:// path taken apart. repo_id: "OWNER/REPO"; revision: a branch, tag or commit (None:
    the default branch); path: the file or folder inside the repository, without outer slashes."""

    text: str
    repo_id: str
    revision: Optional[str]
    path: str


def is_hub_path(value: object) -> bool:
    """True for a string that starts with hf:// (a Path never does: it keeps one slash of two)."""
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse_hub_path(text: str) -> HubPath:
    """`hf://OWNER/REPO[@REVISION]/PATH` taken apart; CheckpointError for anything else (PATH must
    name a file or folder: the whole repository is not accepted)."""
    match = _HUB_PATH.fullmatch(text[len(HUB_PREFIX):]) if is_hub_path(text) else None
    path = (match.group("path") or "").strip("/") if match else ""
    if not path:
        raise CheckpointError(f"malformed Hugging Face path {text!r}: write {HUB_FORMS} (PATH: a file or folder in the repository)")
    if match.group("repo").split("/")[0] in _OTHER_REPO_KINDS:
        raise CheckpointError(f"{text}: only model repositories are read; write {HUB_FORMS}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise CheckpointError(f"malformed Hugging Face path {text!r}: PATH has an empty, '.' or '..' part")
    revision = match.group("revision")
    return HubPath(text, match.group("repo"), unquote(revision) if revision else None, path)


def local_path(value: PathLike) -> Path:
    """A user-given model file: an hf:// path fetched as `hub_local_path` does, any other as it is."""
    return hub_local_path(value) if is_hub_path(value) else Path(value).expanduser()


def gate_pair(text: str) -> Tuple[str, ...]:
    """The file that makes a pair with a re-ranker file of ours (x.safetensors <-> x.json), by name."""
    stem, suffix = os.path.splitext(text.rstrip("/").rsplit("/", 1)[-1])
    return {".safetensors": (stem + ".json",), ".json": (stem + ".safetensors",)}.get(suffix, ())


def hub_local_path(text: str, required_beside: Sequence[str] = (), optional_beside: Sequence[str] = ()) -> Path:
    """The local copy of an hf:// file or folder, in huggingface_hub's cache (fetched unless there).

    A file is fetched with `hf_hub_download`, then the files named in `required_beside` and
    `optional_beside` from the same folder of the same commit (a missing required one is an
    error); a folder with `snapshot_download` of PATH/* (all its files). huggingface_hub's own
    settings apply (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT). Its errors
    (not installed, offline and not cached, no such repository / revision / file, the network)
    become one-line CheckpointErrors that name `text`; anything else is a bug and propagates.
    """
    hub = parse_hub_path(text)
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants as hub_settings
    except ImportError:
        raise CheckpointError(f"{text} needs huggingface_hub: {HUB_INSTALL}") from None
    try:
        try:
            found = Path(hf.hf_hub_download(repo_id=hub.repo_id, filename=hub.path, revision=hub.revision))
        except Exception as exc:
            if "EntryNotFoundError" not in _class_names(exc):
                raise
            found = _hub_folder(hf, hub, exc)
    except Exception as exc:
        reason = _hub_reason(hub, exc, hub_settings)
        if reason is None:
            raise
        raise CheckpointError(f"{text}: {reason}") from None
    if found.is_file():
        for name in (*required_beside, *optional_beside):
            _fetch_beside(hf, hub_settings, hub, found, name, required=name in required_beside)
    return found


def _hub_folder(hf, hub: HubPath, file_error: Exception) -> Path:
    """PATH as a folder: its files fetched; `file_error` (the file look-up's) when it is no folder either."""
    snapshot = Path(hf.snapshot_download(repo_id=hub.repo_id, revision=hub.revision, allow_patterns=[f"{hub.path}/*"]))
    folder = snapshot / hub.path
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    raise file_error


def _fetch_beside(hf, hub_settings, hub: HubPath, found: Path, name: str, required: bool) -> None:
    """Fetch `name` from the folder of `hub.path`, at the commit `found` came from."""
    depth = hub.path.count("/") + 1
    snapshot = found.parents[depth - 1] if len(found.parents) >= depth else None
    commit = snapshot.name if snapshot is not None and snapshot.parent.name == "snapshots" else hub.revision
    folder = hub.path.rsplit("/", 1)[0] + "/" if "/" in hub.path else ""
    other = HubPath(f"hf://{hub.repo_id}{'@' + hub.revision if hub.revision else ''}/{folder}{name}", hub.repo_id, commit, folder + name)
    try:
        hf.hf_hub_download(repo_id=hub.repo_id, filename=other.path, revision=commit)
    except Exception as exc:
        if not required and "EntryNotFoundError" in _class_names(exc):
            return
        reason = _hub_reason(other, exc, hub_settings)
        if reason is None:
            raise
        raise CheckpointError(f"{hub.text} needs {other.text} beside it: {reason}") from None


def _class_names(exc: BaseException) -> set:
    """Names of the exception's classes: huggingface_hub's errors are matched by name, as their
    module moved between versions."""
    return {cls.__name__ for cls in type(exc).__mro__}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _hub_reason(hub: HubPath, exc: BaseException, hub_settings) -> Optional[str]:
    """What went wrong fetching `hub`, in words for a one-line message; None when `exc` is not a
    hub, network or file-system error (a bug, to keep its traceback). hub_settings:
    huggingface_hub.constants (its cache folder and offline switch, as it read them)."""
    names = _class_names(exc)
    cache = getattr(hub_settings, "HF_HUB_CACHE", "huggingface_hub's cache")
    if "LocalEntryNotFoundError" in names:
        if getattr(hub_settings, "HF_HUB_OFFLINE", False):
            return (f"not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: fetch it once with the "
                    "network on, or unset HF_HUB_OFFLINE")
        return (f"the Hugging Face Hub cannot be reached and it is not in the cache ({cache}): check the network "
                "(proxy, HF_ENDPOINT) or set HF_HUB_CACHE to a cache that holds it")
    if "GatedRepoError" in names:
        return (f"{hub.repo_id} is gated: accept its conditions on its Hugging Face page, then log in "
                "(HF_TOKEN, or `hf auth login`)")
    if "RepositoryNotFoundError" in names:
        return (f"no model repository {hub.repo_id} on the Hugging Face Hub (or it is private: log in with "
                "HF_TOKEN or `hf auth login`)")
    if "RevisionNotFoundError" in names:
        return f"{hub.repo_id} has no revision {hub.revision!r} (a branch, tag or commit)"
    if "EntryNotFoundError" in names:
        at = f" at revision {hub.revision!r}" if hub.revision else ""
        return f"{hub.repo_id}{at} has no file or folder {hub.path}"
    if "HFValidationError" in names:
        return f"not a valid repository name or revision ({_first_line(exc)})"
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests", "urllib3"):
        return f"fetching it from the Hugging Face Hub failed: {_first_line(exc)}"
    return None
