"""Where an Optuna study of soup weights is stored and what it is called.

The storage is an Optuna RDB URL of its own, never MLflow's database
(:func:`storage_url`; by default ``optuna.db`` next to MLflow's SQLite file,
:func:`default_study_storage`), opened with heartbeats so a killed run's
trial is failed and run again (:func:`study_storage`); a URL is shown and
logged without its password (:func:`redact_url`). The study's name
(:func:`study_name_for`) changes with everything that changes the scores, so
a study is only resumed when its trials are comparable.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .mixing import SoupError

__all__ = [
    "HEARTBEAT_S",
    "GRACE_S",
    "study_storage",
    "shown_storage",
    "redact_url",
    "default_study_storage",
    "storage_url",
    "study_name_for",
]

#: Optuna heartbeat of a running trial (seconds) and how long a missing
#: heartbeat is tolerated before another process fails the trial as dead
#: (a killed run leaves its trial RUNNING for ever otherwise).
HEARTBEAT_S = 10
GRACE_S = 30


def study_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Any:
    """The Optuna ``RDBStorage`` the search uses for an RDB URL.

    With heartbeats: a running trial records one every ``heartbeat_s``
    seconds; a trial silent for ``grace_s`` seconds (its process was killed)
    is failed by the next process that looks, and its parameters are queued
    again once (so a killed uniform trial is still evaluated).
    """
    import optuna

    # SQLite: concurrent runs wait for each other's writes instead of failing
    # with "database is locked" after the driver's default 5 s.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s,
                    heartbeat_stale_trial_callback=retry,
                )
            if url.startswith("sqlite"):
                _lock_sqlite_transactions(storage.engine)
            return storage
        except Exception as error:
            # Two runs creating the schema of a new database at the same
            # moment: one fails on Optuna's version row; the tables exist
            # now, so opening again works.
            if "UNIQUE constraint" not in str(error) and "already exists" not in str(error) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _lock_sqlite_transactions(engine: Any) -> None:
    """Makes every transaction on a SQLite engine take the write lock at its start.

    Optuna claims a queued trial by reading its state and then setting it to
    RUNNING, relying on ``SELECT … FOR UPDATE``, which SQLite ignores; and
    Python's sqlite3 driver only begins a transaction at the first write. So
    two processes could both read WAITING and both run the same trial (the
    uniform soup, trial 0, twice, one of them then refused at ``tell``).
    ``BEGIN IMMEDIATE`` makes the read and the write one step: the second
    process waits for the first to commit and then sees RUNNING. This is
    SQLAlchemy's documented recipe for serialisable pysqlite transactions.
    """
    from sqlalchemy import event

    def driver_begins_nothing(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    def begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", driver_begins_nothing)
    event.listen(engine, "begin", begin_immediate)
    engine.dispose()  # connections opened while Optuna set up the schema lack the first hook


def shown_storage(storage: Any) -> str | None:
    """The storage's URL as runs and messages show it: without its password."""
    if storage is not None and not isinstance(storage, str):
        storage = str(getattr(storage, "url", storage))
    return None if storage is None else redact_url(storage)


def redact_url(url: str) -> str:
    """``postgresql://user:***@host/db`` for a URL with a password.

    MLflow logs every parameter as given, so a team keeps the password out of
    ``study_storage`` (libpq reads ``PGPASSWORD`` or ``~/.pgpass``); what this
    project logs or prints itself never holds one either way.
    """
    if "@" not in url or "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def _sqlite_file(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).expanduser().resolve()
    return None


def default_study_storage(tracking_uri: str | None = None) -> str:
    """``sqlite:///<dir>/optuna.db`` next to MLflow's SQLite file, or in the
    working directory when MLflow uses another store (a server)."""
    import mlflow

    tracking = _sqlite_file(tracking_uri or mlflow.get_tracking_uri())
    folder = tracking.parent if tracking is not None else Path.cwd().resolve()
    return f"sqlite:///{folder / 'optuna.db'}"


def storage_url(text: str | None) -> str:
    """The Optuna storage URL of ``-P study_storage``.

    Args:
        text: A URL, a file path (made a SQLite URL, its folder created), or
            None/empty for :func:`default_study_storage`.

    Raises:
        SoupError: the URL names MLflow's own SQLite file.
    """
    import mlflow

    if not text:
        url = default_study_storage()
    elif "://" in text:
        url = text
    else:  # a file path
        path = Path(text).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    study_file = _sqlite_file(url)
    if study_file is not None and study_file == _sqlite_file(mlflow.get_tracking_uri()):
        raise SoupError(
            f"the Optuna study must not live in MLflow's own "
            f"database ({study_file}); use another file, e.g. "
            f"{study_file.parent / 'optuna.db'}"
        )
    if study_file is not None:  # SQLite creates the file, not its folder
        study_file.parent.mkdir(parents=True, exist_ok=True)
    return url


def study_name_for(
    model_name: str,
    ingredients: Sequence[Any],
    objective: str,
    seed: int,
    evaluated: Mapping[str, Any],
) -> str:
    """``<model>:<aliases>:<objective>:seed<seed>:<digest>``.

    The digest covers what else changes the scores (versions, data, split),
    so a study is only resumed when its trials are comparable. The versions'
    source runs are in it too: version numbers start again at 1 in another
    MLflow store, while one Optuna storage (a shared database, or
    ``optuna.db`` in the working directory next to a tracking server)
    outlives stores.

    Args:
        model_name: The registered model.
        ingredients: :class:`~uda.soup.ingredients.IngredientRef` (label,
            version, run_id).
        objective: ``miou`` or ``teacher-agreement``.
        seed: The sampler's seed.
        evaluated: What else the scores depend on (root, split, scale …).
    """
    digest = hashlib.sha1(
        json.dumps(
            dict(
                versions=[i.version for i in ingredients], runs=[i.run_id for i in ingredients], **evaluated
            ),
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:8]
    return f"{model_name}:{','.join(i.label for i in ingredients)}:{objective}:seed{seed}:{digest}"
