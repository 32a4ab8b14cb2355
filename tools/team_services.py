#!/usr/bin/env python
"""A team's services on one machine: PostgreSQL and an ``mlflow server`` on it.

The one owner of starting and stopping these services, for a try-out and for
the tests (``tests/test_team_server.py`` starts them through this module):

* a PostgreSQL server in a data folder of its own, on 127.0.0.1, with two
  databases, ``mlflow`` (the tracking and registry store) and ``optuna`` (the
  soup's shared studies: Optuna must not share MLflow's database);
* ``mlflow server --backend-store-uri postgresql://… --artifacts-destination
  <folder>``: artifacts are proxied through the server (``mlflow-artifacts:``),
  so clients need only ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``.

Try it out (PostgreSQL's programs from your system, e.g.
``apt-get install postgresql``)::

    python tools/team_services.py start --dir /srv/cs2acdc-team   # prints the environment
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    mlflow run . -P soup_trials=8
    python tools/team_services.py stop --dir /srv/cs2acdc-team

A real team runs the same two services on a shared host, with the artifacts
on a shared path or an S3-compatible store (README, "Scaling out").

Only the standard library is imported at the top: the tests import this
module before anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

#: The PostgreSQL role the services create (a superuser of its own cluster).
DB_USER = "cs2acdc"
DATABASES = ("mlflow", "optuna")


class ServiceError(RuntimeError):
    """A service could not be started; the message says what to install or check."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or None.

    Debian keeps them out of PATH, in ``/usr/lib/postgresql/<major>/bin``.
    """
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as ``postgres``."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceError(
            "running as root, PostgreSQL needs runuser (util-linux) to start as the postgres user"
        )
    return [runuser, "-u", "postgres", "--", *cmd]


def _reachable_by_server_user(path: Path) -> bool:
    """Whether the postgres user can reach ``path`` (as root, a folder such
    as pytest's ``/tmp/pytest-of-root`` is closed to other users)."""
    if os.geteuid() != 0:
        return True
    return all(parent.stat().st_mode & 0o001 for parent in path.resolve().parents)


def _server_user_owns(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _run(cmd: list[str], what: str, log_file: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        if log_file is not None and log_file.is_file():
            tail += "\n--- server log ---\n" + log_file.read_text()[-2000:]
        raise ServiceError(f"{what} failed (exit {result.returncode}):\n{tail}")


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1:``port``."""

    data_dir: Path
    port: int
    #: A folder made for the cluster because the one asked for was out of the
    #: postgres user's reach; removed by :meth:`stop`.
    scratch_dir: Path | None = None

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls, base_dir: Path, port: int | None = None, allow_scratch: bool = False) -> Postgres:
        """Initialises a cluster in ``base_dir/pgdata`` (once) and starts it.

        Args:
            base_dir: Where the cluster lives (kept between starts).
            port: The port (default: a free one).
            allow_scratch: When the postgres user cannot reach ``base_dir``
                (running as root under a closed folder, as pytest's temp
                folders are), put a throw-away cluster in a temp folder of
                its own, removed by :meth:`stop`, instead of failing.

        Raises:
            ServiceError: PostgreSQL's programs are missing, the folder is
                out of the postgres user's reach, or the server does not
                start (the message holds its log).
        """
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise ServiceError(
                "PostgreSQL's server programs (initdb, pg_ctl) are not installed; "
                "on Debian/Ubuntu: apt-get install postgresql (tools/install_services.sh)"
            )
        base_dir.mkdir(parents=True, exist_ok=True)
        scratch = None
        if not _reachable_by_server_user(base_dir / "pgdata"):
            if not allow_scratch:
                raise ServiceError(
                    f"the postgres user cannot reach {base_dir} (a parent folder is closed to "
                    "other users); use a folder such as /srv/cs2acdc-team or /tmp/cs2acdc-team"
                )
            scratch = Path(tempfile.mkdtemp(prefix="cs2acdc-postgres-"))
            scratch.chmod(0o755)  # mkdtemp's 0700 would keep the postgres user out
            base_dir = scratch
        data_dir = base_dir / "pgdata"
        socket_dir = base_dir / "socket"
        socket_dir.mkdir(exist_ok=True)
        _server_user_owns(socket_dir)
        server = cls(data_dir=data_dir, port=port or free_port(), scratch_dir=scratch)
        log_file = server.log_file
        log_file.touch()
        _server_user_owns(log_file)
        if not (data_dir / "PG_VERSION").is_file():
            data_dir.mkdir(exist_ok=True)
            _server_user_owns(data_dir)
            _run(
                _as_server_user(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(data_dir),
                        "-U",
                        DB_USER,
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-instructions",
                    ]
                ),
                "initdb",
            )
        options = f"-p {server.port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if scratch is not None:
            options += " -c fsync=off"  # a throw-away cluster: speed over durability
        try:
            _run(
                _as_server_user(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(data_dir),
                        "-l",
                        str(log_file),
                        "-o",
                        options,
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                ),
                "starting PostgreSQL",
                log_file,
            )
            for name in DATABASES:
                server.create_database(name)
        except BaseException:
            server.stop()  # a started server, or the scratch folder, is not left behind
            raise
        return server

    def create_database(self, name: str) -> None:
        import psycopg  # the client in the lock; imported late (see module docstring)

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists is None:
                connection.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is not None and (self.data_dir / "postmaster.pid").is_file():
            subprocess.run(
                _as_server_user(
                    [str(bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
                text=True,
            )
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)


@dataclass
class TrackingServer:
    """``mlflow server`` on PostgreSQL, proxying artifacts to a folder."""

    process: subprocess.Popen
    port: int
    log_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        backend_uri: str,
        artifacts_dir: Path,
        log_file: Path,
        port: int | None = None,
        workers: int = 2,
        timeout_s: float = 120.0,
    ) -> TrackingServer:
        """Starts the server and waits until ``/health`` answers.

        Raises:
            ServiceError: The server exits or does not answer in time (the
                message holds its log).
        """
        port = port or free_port()
        artifacts_dir.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow) if mlflow.exists() else "mlflow",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        server = cls(process=process, port=port, log_file=log_file)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                stop_process_group(process.pid)  # workers it may have left
                raise ServiceError(
                    f"mlflow server exited with {process.returncode}:\n" + log_file.read_text()[-3000:]
                )
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        server.stop()
        raise ServiceError(
            f"mlflow server did not answer on {server.url} within "
            f"{timeout_s:.0f} s:\n" + log_file.read_text()[-3000:]
        )

    def stop(self) -> None:
        stop_process_group(self.process.pid)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def stop_process_group(pid: int) -> None:
    """SIGTERM, then SIGKILL, the server and its workers (one session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@dataclass
class TeamServices:
    """PostgreSQL + ``mlflow server``, started together and stopped together."""

    base_dir: Path
    postgres: Postgres
    tracking: TrackingServer

    @property
    def tracking_uri(self) -> str:
        return self.tracking.url

    @property
    def optuna_storage(self) -> str:
        return self.postgres.url("optuna")

    @classmethod
    def start(
        cls,
        base_dir: Path,
        mlflow_port: int | None = None,
        postgres_port: int | None = None,
        workers: int = 2,
        allow_scratch: bool = False,
    ) -> TeamServices:
        """Starts PostgreSQL, then the tracking server on it (see
        :meth:`Postgres.start` for ``allow_scratch``)."""
        base_dir = Path(base_dir)
        postgres = Postgres.start(base_dir, port=postgres_port, allow_scratch=allow_scratch)
        try:
            tracking = TrackingServer.start(
                postgres.url("mlflow"),
                base_dir / "artifacts",
                base_dir / "mlflow-server.log",
                port=mlflow_port,
                workers=workers,
            )
        except BaseException:
            postgres.stop()
            raise
        services = cls(base_dir=base_dir, postgres=postgres, tracking=tracking)
        (base_dir / "services.json").write_text(
            json.dumps(
                {
                    "postgres_port": postgres.port,
                    "postgres_data_dir": str(postgres.data_dir),
                    "mlflow_port": tracking.port,
                    "mlflow_pid": tracking.process.pid,
                }
            )
        )
        return services

    def stop(self) -> None:
        self.tracking.stop()
        self.postgres.stop()


def _stop_recorded(base_dir: Path) -> None:
    record = base_dir / "services.json"
    if not record.is_file():
        raise ServiceError(f"no services were started in {base_dir} (no services.json)")
    state = json.loads(record.read_text())
    pid = int(state["mlflow_pid"])
    try:  # a pid can be reused: only ever stop an mlflow server
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        command_line = b""
    if b"mlflow" in command_line and b"server" in command_line:
        stop_process_group(pid)
    data_dir = Path(state["postgres_data_dir"])
    Postgres(
        data_dir=data_dir,
        port=int(state["postgres_port"]),
        scratch_dir=None if data_dir.parent == base_dir else data_dir.parent,
    ).stop()
    record.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument(
        "--dir", type=Path, required=True, help="folder for the database cluster, artifacts and logs"
    )
    parser.add_argument("--port", type=int, default=5000, help="the tracking server's port")
    parser.add_argument(
        "--postgres-port",
        type=int,
        default=None,
        help="default: a free port (5432 is often taken by a system cluster)",
    )
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        if args.action == "stop":
            _stop_recorded(args.dir.resolve())
            print(f"stopped the services in {args.dir}")
            return 0
        services = TeamServices.start(
            args.dir.resolve(), mlflow_port=args.port, postgres_port=args.postgres_port, workers=args.workers
        )
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"PostgreSQL on 127.0.0.1:{services.postgres.port} (databases: "
        f"{', '.join(DATABASES)}; log {services.postgres.log_file})"
    )
    print(
        f"mlflow server on {services.tracking_uri} (artifacts in {args.dir / 'artifacts'}; "
        f"log {services.tracking.log_file})"
    )
    print("In each shell of the team:")
    print(f"  export MLFLOW_TRACKING_URI={services.tracking_uri}")
    print("A soup study shared by several runs:")
    print(f"  mlflow run . -e soup -P study_storage={services.optuna_storage}")
    print(f"Stop both: python tools/team_services.py stop --dir {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
