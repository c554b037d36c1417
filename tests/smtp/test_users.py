"""`sendguard user add` and the users file: salted scrypt hashes, atomic writes, live reload."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.smtp.auth import UserStore, add_user, hash_password, verify_password
from tests.conftest import ROOT


def user_add(users: Path, name: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "user", "add", name, "--users-file", str(users), "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_user_add_writes_a_salted_hash_readable_only_by_the_owner(tmp_path: Path) -> None:
    users = tmp_path / "users"
    result = user_add(users, "alice", "correct horse")
    assert result.returncode == 0
    assert result.stdout.strip() == f"added user alice in {users}"
    line = users.read_text().strip()
    assert line.startswith("alice:scrypt$16384$8$1$")
    assert "correct horse" not in line
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert UserStore(str(users)).check("alice", "correct horse")
    assert not UserStore(str(users)).check("alice", "wrong")
    assert not UserStore(str(users)).check("mallory", "correct horse")


def test_user_add_again_changes_the_password(tmp_path: Path) -> None:
    users = tmp_path / "users"
    user_add(users, "alice", "one")
    user_add(users, "bob", "two")
    result = user_add(users, "alice", "three")
    assert result.stdout.strip() == f"updated user alice in {users}"
    store = UserStore(str(users))
    assert len(store) == 2
    assert store.check("alice", "three")
    assert not store.check("alice", "one")


@pytest.mark.parametrize(("name", "password"), [("bad name", "x"), ("alice", ""), ("a:b", "x")])
def test_bad_names_and_empty_passwords_are_refused(tmp_path: Path, name: str, password: str) -> None:
    result = user_add(tmp_path / "users", name, password)
    assert result.returncode == 2
    assert result.stderr.startswith("sendguard: ")


def test_the_store_sees_a_new_user_without_restart(tmp_path: Path) -> None:
    users = tmp_path / "users"
    store = UserStore(str(users))
    assert not store.check("carol", "pw")
    add_user(str(users), "carol", "pw")
    assert store.check("carol", "pw")


def test_two_hashes_of_one_password_differ_and_both_verify() -> None:
    first, second = hash_password("same"), hash_password("same")
    assert first != second
    assert verify_password("same", first)
    assert verify_password("same", second)
    assert not verify_password("same", "md5$nonsense")
