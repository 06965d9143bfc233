"""Identity of a model source (checkpoint file, model folder, hub id) for the fingerprints of stored artefacts.

A file is identified by its size and a SHA-256 of its first and last MiB, not of all of it: official checkpoints
are gigabytes, and hashing them whole on every command would cost seconds to minutes, while two different sets of
weights of one architecture already differ in those bytes (the first and last tensors of a state dict are weights;
a safetensors header alone would not do, as it holds only names, shapes and offsets, so the first MiB reaches well
past it). Small files (configs, tokenizers) are hashed whole. A folder is the identity of each file in it, by
relative path. A hub id is resolved to the snapshot in the local Hugging Face cache when there is one (its folder
name is the commit), else identified by the id itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EDGE = 1 << 20  # bytes hashed at each end of a large file
SMALL = 2 * EDGE  # files up to this size are hashed whole


def file_identity(path: str | os.PathLike) -> str:
    """``size:sha256`` of the whole file when small, else of its first and last :data:`EDGE` bytes."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= SMALL:
            h.update(f.read())
        else:
            h.update(f.read(EDGE))
            f.seek(size - EDGE)
            h.update(f.read(EDGE))
    return f"{size}:{h.hexdigest()[:32]}"


def folder_identity(path: str | os.PathLike) -> str:
    """Hash of ``relative path = file identity`` for every file under ``path`` (hidden files left out)."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}={file_identity(p)}\n".encode())
    return h.hexdigest()[:32]


def source_identity(source: str | None) -> str | None:
    """Identity of a model source as given in a config: a file, a folder, or a hub id (None stays None)."""
    if source is None:
        return None
    p = Path(source).expanduser()
    if p.is_file():
        return f"file:{file_identity(p)}"
    if p.is_dir():
        return f"folder:{folder_identity(p)}"
    return f"hub:{source}@{_cached_revision(source) or 'unknown'}"


def _cached_revision(repo_id: str) -> str | None:
    """The commit of the newest snapshot of ``repo_id`` in the local Hugging Face cache, if any."""
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        return None
    try:
        repos = [r for r in scan_cache_dir().repos if r.repo_id == repo_id]
    except Exception:  # no cache folder yet, or one huggingface_hub cannot read: the id alone identifies it
        return None
    revisions = [rev for r in repos for rev in r.revisions]
    return max(revisions, key=lambda rev: rev.last_modified).commit_hash if revisions else None
