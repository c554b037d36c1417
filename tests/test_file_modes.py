"""Files that hold personal data or secrets are not readable by other users (issue 15 part 7,
AVG art. 32): the consent database (and its WAL), the audit log (also after rotation) and the
users file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from proxy.observability.logsetup import AuditLog
from proxy.smtp.auth import add_user
from proxy.stores.consent import ConsentStoreConfig, open_consent_store


def others_can_read(path: Path) -> bool:
    return bool(stat.S_IMODE(path.stat().st_mode) & 0o007)


async def test_the_consent_database_is_private(tmp_path: Path) -> None:
    path = tmp_path / "consent.db"
    store = await open_consent_store(ConsentStoreConfig(backend="sqlite", path=str(path)))
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for companion in (tmp_path / "consent.db-wal", tmp_path / "consent.db-shm"):
        if companion.exists():
            assert not others_can_read(companion), companion


async def test_an_existing_world_readable_consent_database_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "consent.db"
    store = await open_consent_store(ConsentStoreConfig(backend="sqlite", path=str(path)))
    await store.close()
    os.chmod(path, 0o644)
    store = await open_consent_store(ConsentStoreConfig(backend="sqlite", path=str(path)))
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_audit_log_and_its_rotations_are_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path), max_size=200, keep=2)
    for number in range(10):  # rotates after a few lines
        audit.write({"txn": number, "filler": "x" * 80})
    audit.close()
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) >= 2
    for file in files:
        assert not others_can_read(file), (file, oct(file.stat().st_mode))


def test_the_users_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(str(path), "alice", "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
