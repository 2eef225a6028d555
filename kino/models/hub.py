"""Model folders from the Hugging Face Hub: `--model ORG/NAME[@REVISION]` wherever a model
folder is taken (generation, `kino convert wan`, a training run's `init_from`).

A name that is not a folder on disk but has the form of a Hub repository id is downloaded with
huggingface_hub into its usual cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only what
is there; a gated repository needs `hf auth login` or HF_TOKEN), and the snapshot folder is
used as a local folder: a kino model folder, or a Wan2.1 folder in either layout.

Every file is checked before use against the hash the Hub records for it: the cache names
each file's content by that hash (the sha256 of a large, LFS-stored file; the git blob sha1
of a small one), and kino hashes the file again and compares. A file that does not match is
an error naming it. A big file's check is remembered while the file is unchanged
(kino.models.folder.checked_sha256), so loading the same weights again costs no second hash.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from kino.errors import KinoUserError
from kino.models.folder import checked_sha256

# ORG/NAME as the Hub spells repository ids, optionally @REVISION (a branch, tag or commit)
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w.-]+))?$")
# one file of a repository: ORG/NAME[@REVISION]/PATH
HUB_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<revision>[\w.-]+))?"
                      r"/(?P<file>[^@]+)$")
# files a model never needs: pictures and example clips in model cards, the cards themselves
IGNORE = ["*.md", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.mp4", "assets/*", "examples/*"]
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# snapshots this process has downloaded or found and checked: a run resolves its model from
# several places (CLI, loaders, a training config) and asks the Hub and hashes files once
_RESOLVED: dict[tuple, Path] = {}


def hub_id(spec: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision) when `spec` names a Hub repository rather than a folder on disk."""
    text = str(spec)
    match = HUB_ID.match(text)
    if match is None or _local(text):
        return None
    return match["repo"], match["revision"]


def _local(text: str) -> bool:
    """A name that means the disk: it exists there, or it says so (./, ../)."""
    return Path(text).exists() or text.startswith(("./", "../"))


# a model's weights by part, in each layout (kino, Wan's original, diffusers); "dit_2": a
# two-expert model's second DiT. Not downloaded when they come from another file (`--dit
# FILE`, `--text-encoder FILE`) or are not needed.
WEIGHT_PATTERNS = {
    "dit": ("dit/model*.safetensors*", "diffusion_pytorch_model*.safetensors",
            "high_noise_model/diffusion_pytorch_model*", "transformer/diffusion_pytorch_model*"),
    "dit_2": ("dit_2/model*.safetensors*", "low_noise_model/diffusion_pytorch_model*",
              "transformer_2/diffusion_pytorch_model*"),
    "text_encoder": ("text_encoder/umt5/model*.safetensors", "models_t5_umt5-xxl-enc-bf16.pth",
                     "text_encoder/model*.safetensors"),
}


def weights_skipped(*parts: str) -> tuple[str, ...]:
    """The patterns of the weights of `parts` ("dit", "dit_2", "text_encoder") not to download."""
    return tuple(p for part in parts for p in WEIGHT_PATTERNS[part])


def weights_replaced(**files) -> tuple[str, ...]:
    """`weights_skipped` for the parts given a file of their own, e.g. (dit=FILE, text_encoder=None)."""
    return weights_skipped(*[part for part, file in files.items() if file is not None])


def resolve_model(spec: str | Path, skip: tuple[str, ...] = ()) -> Path:
    """The local folder `spec` names: itself when it exists on disk, else the verified snapshot
    of the Hub repository it names (downloaded on first use, but for files matching `skip`)."""
    found = hub_id(spec)
    if found is None:
        return Path(spec)
    from huggingface_hub import constants, snapshot_download  # a dependency of transformers

    key = (*found, constants.HF_HUB_CACHE, tuple(skip))
    if key in _RESOLVED:
        return _RESOLVED[key]
    repo, revision = found
    ignore = IGNORE + list(skip)
    folder = Path(_download(lambda: snapshot_download(repo, revision=revision, ignore_patterns=ignore),
                            f"folder {spec}", repo))
    verify_snapshot(folder, repo)
    _RESOLVED[key] = folder
    return folder


def resolve_file(spec: str | Path) -> Path:
    """The local file `spec` names: itself when it exists on disk, else the verified download
    of ORG/NAME[@REVISION]/PATH, one file of a Hub repository (e.g. a LoRA)."""
    text = str(spec)
    match = HUB_FILE.match(text)
    if match is None or _local(text):
        return Path(spec)
    repo, revision, name = match["repo"], match["revision"], match["file"]
    from huggingface_hub import hf_hub_download

    path = Path(_download(lambda: hf_hub_download(repo, name, revision=revision), spec, repo))
    verify_file(path, repo, name)
    return path


def _download(fetch, spec, repo: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return fetch()
    except LocalEntryNotFoundError as e:
        raise KinoUserError(f"no {spec} here, and it is neither in the local Hugging Face Hub cache nor "
                            f"downloadable from {repo} now (offline?): {_first_line(e)}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise KinoUserError(f"no {spec} here, and it could not be downloaded from the Hugging Face Hub "
                            f"repository {repo}: {_first_line(e)}") from None


def verify_snapshot(folder: Path, repo: str) -> None:
    """Check every file of a huggingface_hub cache snapshot against the hash its blob is named
    by (see the module docstring); raise KinoUserError naming the first that differs."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        verify_file(path, repo, path.relative_to(folder))


def verify_file(path: Path, repo: str, rel) -> None:
    """Check one file of a Hub cache snapshot against the hash its blob is named by."""
    blob = Path(path.resolve()).name
    if re.fullmatch(r"[0-9a-f]{64}", blob):
        expected, actual, kind = blob, checked_sha256(path), "sha256"
    elif re.fullmatch(r"[0-9a-f]{40}", blob):
        expected, actual, kind = blob, git_blob_sha1(path), "git blob sha1"
    elif path.suffix in WEIGHT_SUFFIXES:
        raise KinoUserError(f"{repo}: {rel} ({path}) is not a Hub cache file named by its hash, so it cannot be "
                            "checked; download it again into huggingface_hub's cache")
    else:
        return  # a small non-weights file the cache holds under another name
    if actual != expected:
        raise KinoUserError(f"{repo}: {rel} ({path.resolve()}) does not match the {kind} the Hub records for "
                            f"it ({expected}, the file has {actual}): it is damaged or was altered; delete it "
                            "and download again")


def git_blob_sha1(path: Path) -> str:
    """The id git (and so the Hub) gives a small file's content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def folder_name(root: str | Path) -> str:
    """A model folder's name for humans: ORG/NAME for a Hub cache snapshot (whose own name is
    a commit hash), else the folder's name."""
    root = Path(root).resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent.name.removeprefix("models--").replace("--", "/")
    return root.name
