"""Offline embedders: names the embedder setting accepts, and the split-archive assembly of
all-mpnet-base-v2 checked on a small archive built here (sizes, hash, bad members, concurrency)."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from pathlib import Path

import pytest

from hilora_core.errors import InvalidInputError
from hilora_core.models.offline_embedders import (
    MINILM,
    MPNET,
    SplitArchive,
    assemble_split_archive,
    embedder_name,
    installed,
    known_embedder,
    resolve_embedder,
)

FILES = {"tiny/config.json": b'{"a": 1}', "tiny/1_Pooling/config.json": b"{}", "tiny/desktop.ini": b"x",
         "tiny/weights.bin": bytes(range(256)) * 40}


def _archive(tmp: Path, members: dict[str, bytes], n: int = 3) -> tuple[SplitArchive, list[Path]]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = buf.getvalue()
    step = -(-len(data) // n)
    pieces = []
    for i in range(n):
        p = tmp / f"tiny.zip.{i + 1:03d}"
        p.write_bytes(data[i * step:(i + 1) * step])
        pieces.append(p)
    return SplitArchive(packages=tuple(f"part-{i}" for i in range(n)), part_sizes=tuple(p.stat().st_size
                        for p in pieces), sha256=hashlib.sha256(data).hexdigest(), folder="tiny"), pieces


def test_names_resolve_to_one_identity_per_model():
    assert known_embedder("all-mpnet-base-v2") is MPNET and known_embedder("MPNET") is MPNET
    assert known_embedder("sentence-transformers/all-MiniLM-L6-v2") is MINILM and known_embedder("minilm") is MINILM
    assert known_embedder("hkunlp/instructor-base") is None
    assert embedder_name(None) == embedder_name("minilm") == MINILM.name
    assert embedder_name("all-mpnet-base-v2") == MPNET.name
    assert embedder_name("hkunlp/instructor-base") == "hkunlp/instructor-base"  # any hub id, as given
    path, name = resolve_embedder(None)
    assert name == MINILM.name and (Path(path) / "modules.json").is_file()
    assert resolve_embedder("minilm") == (path, name)
    path, name = resolve_embedder("mpnet")
    assert name == MPNET.name
    # offline when its parts are installed, else the hub id (users with a network)
    assert (Path(path) / "model.safetensors").is_file() if installed(MPNET) else path == MPNET.name


def test_a_folder_named_like_a_known_model_is_loaded_as_the_folder(tmp_path, monkeypatch):
    (tmp_path / "mpnet").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_embedder("mpnet") == ("mpnet", "mpnet")


def test_split_archive_is_checked_then_assembled_once(tmp_path):
    archive, pieces = _archive(tmp_path, FILES)
    root = tmp_path / "cache"
    folder = assemble_split_archive(archive, pieces, root)
    assert folder == root / "tiny"
    assert (folder / "weights.bin").read_bytes() == FILES["tiny/weights.bin"]
    assert (folder / "1_Pooling" / "config.json").is_file() and not (folder / "desktop.ini").exists()
    stamp = (folder / "weights.bin").stat().st_mtime_ns
    for p in pieces:  # once assembled, the pieces are not read again
        p.unlink()
    assert assemble_split_archive(archive, pieces, root) == folder
    assert (folder / "weights.bin").stat().st_mtime_ns == stamp


def test_a_damaged_piece_is_refused_and_leaves_no_folder(tmp_path):
    archive, pieces = _archive(tmp_path, FILES)
    data = bytearray(pieces[1].read_bytes())
    data[10] ^= 0xFF  # same size, other bytes
    pieces[1].write_bytes(bytes(data))
    root = tmp_path / "cache"
    with pytest.raises(InvalidInputError, match="SHA-256"):
        assemble_split_archive(archive, pieces, root)
    assert sorted(p.name for p in root.iterdir()) == [".tiny.lock"]
    pieces[2].write_bytes(pieces[2].read_bytes()[:-1])
    with pytest.raises(InvalidInputError, match="bytes, expected"):
        assemble_split_archive(archive, pieces, root)
    with pytest.raises(InvalidInputError, match="pieces given"):
        assemble_split_archive(archive, pieces[:2], root)


@pytest.mark.parametrize("member", ["other/x.json", "tiny/../../escape.txt"])
def test_members_outside_the_model_folder_are_refused(tmp_path, member):
    archive, pieces = _archive(tmp_path, {**FILES, member: b"no"})
    with pytest.raises(InvalidInputError, match="unexpected member"):
        assemble_split_archive(archive, pieces, tmp_path / "cache")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "cache" / "tiny").exists()


def test_concurrent_starts_assemble_one_complete_folder(tmp_path):
    archive, pieces = _archive(tmp_path, FILES)
    root, results, errors = tmp_path / "cache", [], []

    def start() -> None:
        try:
            results.append(assemble_split_archive(archive, pieces, root))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root / "tiny"] * 4
    assert [p.name for p in root.iterdir() if p.name.startswith(".tiny-")] == []  # no temporary folder left
    assert (root / "tiny" / "weights.bin").read_bytes() == FILES["tiny/weights.bin"]


@pytest.mark.skipif(not installed(MPNET), reason="all-mpnet-base-v2's parts are not installed (make setup-mpnet)")
def test_the_installed_mpnet_parts_give_a_working_768d_embedder():
    from hilora_core.models.embedding import SentenceEmbedder

    emb = SentenceEmbedder("all-mpnet-base-v2")
    assert emb.identity.name == MPNET.name and emb.dim == MPNET.dim and emb.identity.instruction_in_pooling
    z = emb.encode(["Convert 678 into English words.", "Spell out 45 in English words.", "Who wrote Hamlet?"])
    assert z.shape == (3, 768)
    assert float(z[0] @ z[1]) > float(z[0] @ z[2])  # two phrasings of one task are closer than another request
