"""The embedded default: a SecantusDB MongoDB-wire server and a PostgreSQL server as child processes.

Both listen on 127.0.0.1 only and keep their data under one data directory, so a second
`msgcore up` finds the data of the first. Production sets MSGCORE_MONGO_URL / MSGCORE_PG_URL and
never reaches this module. The servers come from the optional `[embedded]` extra (SecantusDB is
GPL-2.0), so they are imported lazily.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The embedded server's oplog defaults (100,000 entries or 1 hour) would drop a lagging
# projector's resume token during a large campaign; size it for the worst lag we accept.
OPLOG_MAX_ENTRIES = 20_000_000
OPLOG_RETENTION_S = 7 * 24 * 3600
# Quiet change streams stay resumable only if the oplog keeps moving.
NOOP_HEARTBEAT_S = 2
PG_OS_USER = "pgserver"


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGTERM when the process that started it dies, so a killed
    `msgcore up` (or benchmark) leaves no servers or components running on as orphans. Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message names the cause and the fix."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise EmbeddedError(f"{what} exited with code {proc.returncode} during start; log {log_path}:\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise EmbeddedError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f}s; see {log_path}")


@dataclass
class EmbeddedMongo:
    """A `secantusd-py` child process; `url` is ready once `start()` returns."""

    data_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?replicaSet=secantus&directConnection=true"

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            import secantus  # noqa: F401  (presence check for the optional extra)
        except ImportError as e:
            raise EmbeddedError(
                "the embedded MongoDB-wire server is not installed: run pip install -e '.[embedded]' "
                "or set MSGCORE_MONGO_URL"
            ) from e
        self.port = self.port or free_port()
        storage = self.data_dir / "mongo"
        storage.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "mongo.log"
        cmd = [
            sys.executable, "-m", "ops.secantus_launcher",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--storage-path", str(storage),
            "--oplog-max-entries", str(OPLOG_MAX_ENTRIES),
            "--oplog-retention-seconds", str(OPLOG_RETENTION_S),
            "--noop-heartbeat-seconds", str(NOOP_HEARTBEAT_S),
            "--log-level", "WARNING",
        ]
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        _wait_port(self.port, self.proc, "the embedded MongoDB-wire server", log_path, timeout_s)
        log.info("embedded mongo listening on 127.0.0.1:%d data=%s pid=%d", self.port, storage, self.proc.pid)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("embedded mongo pid=%d did not stop in %.0fs; killing", self.proc.pid, timeout_s)
            self.proc.kill()
            self.proc.wait()


def _pg_bin(name: str) -> str:
    # Locate the wheel's binaries without importing `pgserver` itself: its import has side
    # effects (runtime dirs, lock files, warnings) we do not want.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "the embedded PostgreSQL is not installed: run pip install -e '.[embedded]' or set MSGCORE_PG_URL"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


def _as_pg_user() -> dict[str, object]:
    """PostgreSQL refuses to run as root; when we are root, run its binaries as a system user."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_OS_USER], check=True, capture_output=True)
    return {"user": PG_OS_USER}


def _open_path_for(path: Path) -> None:
    """Let the PostgreSQL OS user traverse (and read) `path` and every parent of it."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o055)


@dataclass
class EmbeddedPostgres:
    """PostgreSQL from the `pgserver` wheel's binaries, listening on 127.0.0.1:port."""

    data_dir: Path
    port: int = 0
    database: str = "msgcore"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pg"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self, timeout_s: float = 60.0) -> None:
        run_as = _as_pg_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        if run_as:
            self.pgdata.mkdir(exist_ok=True)
            shutil.chown(self.pgdata, PG_OS_USER, PG_OS_USER)
            self.pgdata.chmod(0o700)
            _open_path_for(self.data_dir.resolve())
            # Its binaries too: a checkout in a private directory (`mktemp -d` makes it 0700) holds
            # the venv, and the PostgreSQL user must be able to run initdb and postgres from there.
            _open_path_for(Path(_pg_bin("initdb")).resolve().parent)
        if not (self.pgdata / "PG_VERSION").exists():
            subprocess.run(
                [_pg_bin("initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                 "--no-locale"],
                check=True, capture_output=True, **run_as,  # type: ignore[call-overload]
            )
        self._stop_stale(run_as)
        log_path = self.pgdata / "server.log"
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=200 -c fsync=on"
        result = subprocess.run(
            [_pg_bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(log_path), "-o", opts, "-w", "-t",
             str(int(timeout_s)), "start"],
            capture_output=True, text=True, **run_as,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            raise EmbeddedError(f"embedded PostgreSQL did not start: {result.stderr.strip()}; see {log_path}")
        self._ensure_database()
        log.info("embedded postgres listening on 127.0.0.1:%d data=%s", self.port, self.pgdata)

    def _stop_stale(self, run_as: dict[str, object]) -> None:
        """A server left running by a killed `msgcore up` still holds the data dir: stop it first."""
        if (self.pgdata / "postmaster.pid").exists():
            subprocess.run(
                [_pg_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
                capture_output=True, **run_as,  # type: ignore[call-overload]
            )

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self) -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        subprocess.run(
            [_pg_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
            capture_output=True, **_as_pg_user(),  # type: ignore[call-overload]
        )


def write_endpoints(data_dir: Path, endpoints: dict[str, str]) -> None:
    """Record the running servers' URLs so that `msgcore <component>` started alone finds them."""
    path = data_dir / "endpoints.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2))
    tmp.replace(path)


def read_endpoints(data_dir: Path) -> dict[str, str]:
    path = data_dir / "endpoints.json"
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()))
