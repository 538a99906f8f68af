"""A real PostgreSQL server for the audit store's tests: Debian's `postgresql` package, started in a
temporary folder (initdb, then pg_ctl) on a loopback port, and stopped after the session.

PostgreSQL refuses to run as root, so as root the server runs as the package's `postgres` user, in a
folder of its own under /tmp. Password authentication on TCP (SCRAM), so a wrong password is refused
as on a real deployment. `.ci/run` installs the package when it is missing; without it the tests fail
under CI (VERITY_CI) and are skipped elsewhere with the install command.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MISSING = (
    "PostgreSQL's initdb was not found under /usr/lib/postgresql/*/bin: "
    "apt-get install postgresql (.ci/run does this)"
)
USER, PASSWORD = "verity", "audit-test-password"


def postgres_bin() -> Path | None:
    """The newest installed server's bin folder."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def require_postgres() -> Path:
    """The bin folder; fails in CI, skips with the reason elsewhere, when PostgreSQL is not installed."""
    import pytest

    found = postgres_bin()
    if found is not None:
        return found
    if os.environ.get("VERITY_CI"):
        pytest.fail(MISSING)
    pytest.skip(f"PostgreSQL tests skipped: {MISSING}")
    raise AssertionError  # unreachable: skip raises


def start_postgres_or_exit() -> PostgresServer:
    """For a benchmark's command line: a started server, or an exit that says how to install one."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed: apt-get install postgresql (.ci/run does this).")
    return start_postgres(bin_dir)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    bin: Path
    root: Path
    port: int
    as_user: list[str]

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                        "-w", "stop"], check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(bin_dir: Path) -> PostgresServer:
    """initdb and pg_ctl start in a new folder under /tmp, listening on 127.0.0.1 only."""
    root = Path(tempfile.mkdtemp(prefix="verity-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    (root / "password").write_text(PASSWORD + "\n", encoding="utf-8")
    (root / "socket").mkdir()
    if as_user:
        shutil.chown(root, "postgres")
        for path in root.iterdir():
            shutil.chown(path, "postgres")
    initdb = [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", USER, "--pwfile",
              str(root / "password"), "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8",
              "--no-instructions"]  # fmt: skip
    subprocess.run([*as_user, *initdb], check=True, capture_output=True)
    port = free_port()
    options = f"-p {port} -k {root / 'socket'} -c listen_addresses=127.0.0.1 -c max_connections=200"
    start = [str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", options,
             "-w", "-t", "60", "start"]  # fmt: skip
    done = subprocess.run([*as_user, *start], capture_output=True, text=True)
    if done.returncode != 0:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {done.stdout}{done.stderr}{log[-2000:]}")
    return PostgresServer(bin_dir, root, port, as_user)
