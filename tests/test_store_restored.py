"""
The restore step (L{mailsrv.store.restored}): a data folder holding a backup's
mark gets a new, greater UIDVALIDITY in every folder index, once per restore,
even when start-up is cut short midway.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsrv.store.index import FolderIndex, index_base, renew_validity
from mailsrv.store.restored import ID_PREFIX, MARK, renew_after_restore

OLD = 1000  # the UIDVALIDITY each folder had in the backup
NOW = 500  # a clock behind it: the new one is then OLD + 1, so a second bump shows
FOLDERS = ("INBOX", "Sent", "Archive/2026")


def _validity(base: Path) -> int:
    index = FolderIndex(base, lambda: pytest.fail("a restored folder made afresh"))
    try:
        return index.uid_validity
    finally:
        index.close()


def _restored_data(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    data, index_dir = tmp_path / "data", tmp_path / "data" / "index"
    bases = [index_base(index_dir, "example.test", "alice", name) for name in FOLDERS]
    for base in bases:
        FolderIndex(base, lambda: OLD).close()
    (data / MARK).write_text(f"backup of ...\n{ID_PREFIX}1-abc\n")
    return data, index_dir, bases


def test_an_interrupted_renewal_is_finished_at_the_next_start(tmp_path) -> None:
    data, index_dir, bases = _restored_data(tmp_path)
    done: list[Path] = []

    def dies_after_one(path: Path, restore: str, now: int) -> int | None:
        if done:
            raise OSError("the server died here")
        done.append(path)
        return renew_validity(path, restore, now)

    with pytest.raises(OSError):
        renew_after_restore(data, index_dir, lambda: NOW, dies_after_one)
    assert (data / MARK).is_file()  # the job is not done: the mark stays
    assert sorted(_validity(b) for b in bases) == [OLD, OLD, OLD + 1]

    assert renew_after_restore(data, index_dir, lambda: NOW) == len(FOLDERS) - 1
    assert [_validity(b) for b in bases] == [OLD + 1] * len(FOLDERS)  # each bumped once
    assert not (data / MARK).exists()
    assert int((index_dir / "uidvalidity").read_text()) == OLD + 1  # new folders go above

    # An ordinary start: nothing to do, nothing changes.
    assert renew_after_restore(data, index_dir, lambda: NOW) is None
    assert [_validity(b) for b in bases] == [OLD + 1] * len(FOLDERS)


def test_the_new_uidvalidity_is_the_time_when_that_is_greater(tmp_path) -> None:
    data, index_dir, bases = _restored_data(tmp_path)
    assert renew_after_restore(data, index_dir, lambda: OLD * 10) == len(FOLDERS)
    assert [_validity(b) for b in bases] == [OLD * 10] * len(FOLDERS)


def test_a_mark_made_by_hand_gets_an_id_before_any_folder_is_renewed(tmp_path) -> None:
    data, index_dir, bases = _restored_data(tmp_path)
    (data / MARK).write_text("")  # touch BACKUP-COMPLETE: renew all
    seen: list[str] = []

    def dies_at_once(path: Path, restore: str, now: int) -> int | None:
        seen.append(restore)
        raise OSError("the server died here")

    with pytest.raises(OSError):
        renew_after_restore(data, index_dir, lambda: NOW, dies_at_once)
    assert (data / MARK).read_text() == f"{ID_PREFIX}{seen[0]}\n"  # kept for the next start
    assert renew_after_restore(data, index_dir, lambda: NOW) == len(FOLDERS)
    assert [_validity(b) for b in bases] == [OLD + 1] * len(FOLDERS)
