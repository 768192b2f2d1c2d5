"""archives.py: one archive rule and one size limit for `convert` and `score` (issue 20 item 6, issue 21 item 27)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, write_image_folder
from train_pytorch_model import archives, convert, score
from train_pytorch_model.errors import InvalidDatasetError, InvalidParameterError
from train_pytorch_model.score import images_to_score


def zip_of(tree: Path, archive: Path, padding: int = 0) -> Path:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, f"dataset/{path.relative_to(tree).as_posix()}")
        if padding:
            zf.writestr("dataset/a/zeros.png", b"\0" * padding)  # compresses to almost nothing
    return archive


def test_convert_and_score_share_the_archive_rule_and_limit():
    assert convert.extract_archive is score.extract_archive is archives.extract_archive
    assert convert.archive_in is score.archive_in is archives.archive_in
    defaults = {}
    for module in (convert, score):
        import argparse

        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        defaults[module.__name__] = next(a.default for a in parser._actions if a.dest == "max_extracted_gib")
    assert set(defaults.values()) == {archives.MAX_EXTRACTED_GIB}


def test_score_extraction_limit_can_be_lowered(tmp_path):
    tree = write_image_folder(tmp_path / "tree", {"a": 2}, size=(16, 16))
    archive = zip_of(tree, tmp_path / "images.zip", padding=4 * 2**20)
    with pytest.raises(InvalidDatasetError, match="unpacks to more than 0.001 GiB"):
        with images_to_score([archive], max_extracted_bytes=archives.extracted_bytes_limit(0.001)):
            pass
    with images_to_score([archive]) as directory:  # the default allows it
        assert len(directory) == 3
    with pytest.raises(InvalidParameterError, match="Max extracted GiB"):
        archives.extracted_bytes_limit(0)


def test_score_reads_a_folder_holding_only_an_archive_as_convert_does(tmp_path):
    tree = write_image_folder(tmp_path / "tree", {"a": 2, "b": 1}, size=(16, 16))
    (tmp_path / "mount").mkdir()
    zip_of(tree, tmp_path / "mount" / "upload.zip")
    with images_to_score([tmp_path / "mount"]) as directory:
        assert sorted(directory.files) == ["a/0.png", "a/1.png", "b/0.png"]


@pytest.mark.slow
def test_a_full_temporary_folder_is_named_as_such_not_as_the_output(tmp_path):
    tree = write_image_folder(tmp_path / "tree", {"a": 2}, size=(16, 16))
    archive = zip_of(tree, tmp_path / "images.zip", padding=2**20)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"  # a write past this fails: a full disk
        "from train_pytorch_model.score import images_to_score\n"
        "from train_pytorch_model.errors import TrainPyTorchModelError\n"
        "try:\n"
        f"    with images_to_score([{str(archive)!r}]):\n"
        "        pass\n"
        "except TrainPyTorchModelError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TemporaryFolderError"), result.stdout
    assert "temporary extraction folder, not --scored-data" in result.stdout and "TMPDIR" in result.stdout


def tar_of_empty_members(archive: Path, count: int) -> Path:
    """A .tar.gz of `count` empty files: a few KiB that would unpack to `count` files."""
    import io
    import tarfile

    with tarfile.open(archive, "w:gz") as tf:
        for i in range(count):
            tf.addfile(tarfile.TarInfo(f"data/a/{i}.png"), io.BytesIO(b""))
    return archive


def test_empty_members_count_against_the_limit_and_are_not_all_kept_in_memory(tmp_path, monkeypatch):
    import tarfile

    archive = tar_of_empty_members(tmp_path / "empty.tar.gz", 2000)
    assert archive.stat().st_size < 64 << 10
    held = []
    next_member = tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: held.append(len(self.members)) or next_member(self))
    limit = 1000 * archives.MEMBER_BYTES  # bytes written: none; members: twice what the limit pays for
    with pytest.raises(InvalidDatasetError, match="unpacks to more than"):
        archives.extract_archive(archive, tmp_path / "out", limit, [], lambda p, e: e)
    assert len(list((tmp_path / "out").rglob("*.png"))) <= 1000
    assert max(held) <= 1  # the members read so far are dropped, not kept by the TarFile
    skipped = []
    archives.extract_archive(archive, tmp_path / "whole", 2000 * archives.MEMBER_BYTES, skipped, lambda p, e: e)
    assert len(list((tmp_path / "whole").rglob("*.png"))) == 2000 and skipped == []
