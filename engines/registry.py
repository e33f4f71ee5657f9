"""The engine registry: every built version of each model, and which one is current.

It is the engine directory itself, a plain tree, so it works the same on a local disk, NFS or
an object-store mount, with no database and no lock daemon::

    <root>/<model id, "/" -> "--">/
        current           the promoted version's name, one line
        <version>/        an artifact (manifest.json + files; see engines.manifest)
        .build-*, .trash-*, .current-*   builds, removals and promotions in flight; never listed

Writers only rename whole things into place (a built artifact, a new `current`) or out of
place (a removed one, before it is deleted), so a reader sees the old state or the new one,
never a partial one. Two promotions racing each other: the last rename wins. On an
object-store mount a directory rename copies object by object, but `current` is one small
object replaced whole, so readers that go through `current` stay safe there too.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import ArtifactError, RegistryError
from engines.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_artifact

CURRENT = "current"


def model_dir(root: Path, model_id: str) -> Path:
    """`model_id`'s directory: always one entry directly under `root` (RegistryError if the
    id cannot be one, e.g. "." or "..", which would put versions in the root or above it)."""
    name = model_id.replace("/", "--") if isinstance(model_id, str) else ""
    # Listing skips dot entries (in-flight work), so a model there would be invisible too;
    # a backslash separates paths on Windows shares; control characters make unusable names.
    if (not name.strip() or name.startswith(".") or "\\" in name
            or any(ord(ch) < 32 or ch == "\x7f" for ch in name)
            or Path(name).name != name):
        raise RegistryError(f"{model_id!r} is not a valid model id: it must name one directory "
                            "under the registry root (e.g. org/name), not start with '.', and "
                            "hold no backslash or control character")
    return Path(root) / name


def _checked(version: str) -> str:
    # A version is one plain directory name: nothing that escapes the model's directory or
    # collides with the pointer and the in-flight dot entries.
    if not version or version == CURRENT or version.startswith(".") or any(
            c in version for c in "/\\\0\n"):
        raise RegistryError(f"{version!r} is not a valid engine version name")
    return version


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    model_id: str
    version: str
    path: Path
    current: bool
    manifest: Manifest | None  # None: unreadable; `problem` says why
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model_id": self.model_id, "version": self.version, "path": str(self.path),
            "current": self.current, "problem": self.problem,
            "head": m.head if m else None, "backend": m.backend if m else None,
            "precision": m.precision if m else None, "max_length": m.max_length if m else None,
            "memory_bytes": m.memory_bytes if m else None,
            "created_at": m.created_at if m else None,
        }


class EngineRegistry:
    """Versions of models under one engine directory (the layout `ensure_engine` builds)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def current(self, model_id: str) -> str | None:
        """The promoted version of `model_id`, or None if none is."""
        try:
            text = (model_dir(self.root, model_id) / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return _checked(text)

    def get(self, model_id: str, version: str | None = None) -> Path:
        """The artifact directory of a version; None means the model's current one."""
        if version is None:
            version = self.current(model_id)
            if version is None:
                raise RegistryError(
                    f"no version of {model_id} is promoted in {self.root}; promote one with "
                    f"`qscore engine promote {model_id} VERSION` "
                    f"(versions here: {self._names(model_id) or 'none'})")
        path = model_dir(self.root, model_id) / _checked(version)
        if not (path / MANIFEST_NAME).is_file():
            raise RegistryError(f"{model_id} has no version {version!r} in {self.root} "
                                f"(versions here: {self._names(model_id) or 'none'})")
        return path

    def show(self, model_id: str, version: str | None = None) -> Manifest:
        return read_manifest(self.get(model_id, version))

    @staticmethod
    def verify(path: Path, smoke: bool = True) -> Manifest:
        """Re-hash every file against the manifest; with `smoke`, also load it and run once."""
        manifest = verify_artifact(Path(path))
        if smoke:
            from engines.loader import load_engine

            load_engine(Path(path), verify=False).health()
        return manifest

    def promote(self, model_id: str, version: str, *, smoke: bool = True) -> Path:
        """Point `model_id`'s current at `version`, once it verifies; returns its path."""
        path = self.get(model_id, version)
        manifest = self.verify(path, smoke=smoke)
        if (manifest.model_id, manifest.version) != (model_id, version):
            raise ArtifactError(path, f"manifest says {manifest.model_id} "
                                      f"{manifest.version}, not {model_id} {version}")
        self._point(path.parent, version)
        return path

    def promote_first(self, model_id: str, version: str) -> bool:
        """Promote `version` if the model has no current one yet (the first build)."""
        if self.current(model_id) is not None:
            return False
        self.promote(model_id, version, smoke=False)
        return True

    def remove(self, model_id: str, version: str, *, force: bool = False) -> None:
        """Delete a version; the current one only with `force` (the model is then unpromoted)."""
        mdir = model_dir(self.root, model_id)
        path = mdir / _checked(version)
        if not path.is_dir():
            raise RegistryError(f"{model_id} has no version {version!r} in {self.root}")
        if self.current(model_id) == version:
            if not force:
                raise RegistryError(f"{model_id} {version} is current: promote another "
                                    "version first, or force the removal")
            # Unpoint first: readers then get "none promoted", not a vanishing directory.
            (mdir / CURRENT).unlink(missing_ok=True)
        # Out of sight in one rename, then delete at leisure: no half-deleted artifact is
        # ever visible under its version name.
        trash = mdir / f".trash-{version}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def list(self, model_id: str | None = None) -> builtins.list[RegistryEntry]:
        """Every version (of one model, or all), oldest first per model."""
        if model_id is not None:
            mdirs = [model_dir(self.root, model_id)]
        elif self.root.is_dir():
            mdirs = sorted(p for p in self.root.iterdir()
                           if p.is_dir() and not p.name.startswith("."))
        else:
            mdirs = []
        entries: builtins.list[RegistryEntry] = []
        for mdir in mdirs:
            entries.extend(self._entries(mdir))
        return entries

    def _entries(self, mdir: Path) -> builtins.list[RegistryEntry]:
        if not mdir.is_dir():
            return []
        try:
            current: str | None = (mdir / CURRENT).read_text().strip()
        except FileNotFoundError:
            current = None
        entries = []
        for path in sorted(p for p in mdir.iterdir()
                           if p.is_dir() and not p.name.startswith(".")):
            try:
                manifest: Manifest | None = read_manifest(path)
                problem = None
            except ArtifactError as exc:
                manifest, problem = None, exc.problem
            model_id = manifest.model_id if manifest else mdir.name.replace("--", "/")
            entries.append(RegistryEntry(model_id, path.name, path, path.name == current,
                                         manifest, problem))
        return sorted(entries, key=lambda e: e.manifest.created_at if e.manifest else 0.0)

    def _names(self, model_id: str) -> str:
        return ", ".join(e.version for e in self.list(model_id))

    @staticmethod
    def _point(mdir: Path, version: str) -> None:
        # Whole new file renamed over the old: a reader opens one or the other, never a
        # half-written name. fsync first so a crash cannot leave an empty pointer behind.
        fd, tmp = tempfile.mkstemp(prefix=".current-", dir=mdir)
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from other users of a share
            with os.fdopen(fd, "w") as fh:
                fh.write(version + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, mdir / CURRENT)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
