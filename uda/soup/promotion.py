"""Moving the ``serving`` alias: the soup's promotion rule, one move at a time, every move recorded.

Several soup runs can finish at the same moment when a team shares one
tracking server. MLflow has no compare-and-set for aliases, so a promotion
holds a lock made of the registry itself: in a database-backed store (SQLite,
PostgreSQL, MySQL, directly or through a tracking server) a registered
model's name is unique, so exactly one run can create
``<model>.promotion-lock`` at a time. (The deprecated ``file:`` store checks
before it creates, and gives no such guarantee.) Inside the lock a run reads where
``serving`` points *now*, moves it, and records the move on both sides:

* its own run: ``soup.promoted``, ``soup.promote_reason``,
  ``soup.serving_before``;
* the version it replaced (tag ``serving.replaced_by``) and that version's
  run (tag ``serving.replaced_by``), so the run that lost a race says
  which version of which run took ``serving`` from it, and when.

``promote=if-better`` compares with the version that was serving when the
soup was scored; if another run moved ``serving`` meanwhile, the comparison
is stale and the soup is not promoted (the reason says so).

The candidate is loaded and run once before the lock is taken
(:func:`uda.registry.verify_loadable`), so the lock is held for a few
requests only, and ``serving`` never points at a model that does not load.
"""

from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator

from uda.errors import UserError

SERVING_ALIAS = "serving"
LOCK_SUFFIX = ".promotion-lock"
#: A lock older than this was left by a killed run (a move takes seconds).
STALE_LOCK_S = 60.0
#: How long a promotion waits for another one to finish.
WAIT_FOR_LOCK_S = 120.0


class PromotionError(UserError):
    """The lock could not be taken (another promotion hangs)."""


@dataclass
class Promotion:
    """What a promotion did."""

    promoted: bool
    reason: str
    serving_before: str | None


def _client():
    import mlflow

    return mlflow.MlflowClient()


def current_serving(model_name: str) -> Any | None:
    """The version ``serving`` points at now, or None."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = _client().get_registered_model(model_name).aliases or {}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if SERVING_ALIAS not in aliases:
        return None
    return _client().get_model_version(model_name, str(aliases[SERVING_ALIAS]))


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


@contextmanager
def promotion_lock(
    model_name: str, holder: str, wait_s: float = WAIT_FOR_LOCK_S, stale_s: float = STALE_LOCK_S
) -> Iterator[None]:
    """Holds ``<model_name>.promotion-lock`` (a registered model) while inside.

    A lock is stale when the same holder and acquisition time have been seen
    for ``stale_s`` seconds on this process's own clock (no trust in the
    holder's clock), and it is broken only if it is still that one right
    before the delete. A lock that names ``holder`` is ours: a create whose
    reply was lost and was sent again by MLflow's HTTP retries.

    Args:
        model_name: The registered model whose alias moves.
        holder: Who holds it (a run id), recorded in the lock's tags.
        wait_s: Longest wait for another holder.
        stale_s: A lock unchanged for this long is broken (its holder was killed).

    Raises:
        PromotionError: still held by another run after ``wait_s``.
    """
    client = _client()
    name = lock_name(model_name)
    deadline = time.monotonic() + wait_s
    said = False
    first_seen: dict[tuple, float] = {}
    while True:
        state = _try_create(client, name, model_name, holder, stale_s)
        if state == "ours":
            break
        if state is not None:  # another run holds it
            seen_at = first_seen.setdefault(state, time.monotonic())
            if time.monotonic() - seen_at > stale_s:
                if _lock_state(client, name) == state:
                    print(
                        f"Breaking the promotion lock of run {state[0]}, unchanged for "
                        f"{stale_s:.0f} s (its run was killed).",
                        flush=True,
                    )
                    _delete_quietly(client, name)
                continue
            if time.monotonic() > deadline:
                raise PromotionError(
                    f"{model_name}@{SERVING_ALIAS} is being moved by run {state[0]}; waited "
                    f"{wait_s:.0f} s. This run's soup is registered but not promoted: point "
                    f"serving at it by hand once that run is done (MlflowClient()."
                    f"set_registered_model_alias), or delete the registered model {name!r} "
                    "if that run is gone."
                )
            if not said:
                print(
                    f"Waiting for run {state[0]} to finish moving {model_name}@{SERVING_ALIAS}.", flush=True
                )
                said = True
        time.sleep(0.2)
    try:
        yield
    finally:
        state = _lock_state(client, name)
        if state is not None and state[0] == holder:  # never another run's lock
            _delete_quietly(client, name)


def _delete_quietly(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _lock_state(client, name: str) -> tuple | None:
    """``(holder, acquired_at)`` of the lock, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        held = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return held.tags.get("holder", ""), held.tags.get("acquired_at", "")


def _try_create(client, name: str, model_name: str, holder: str, stale_s: float) -> Any | None:
    """``'ours'``, the other holder's ``(holder, acquired_at)``, or None
    (released meanwhile: try again)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={"holder": holder, "acquired_at": f"{time.time():.3f}"},
            description=f"Held for a moment while run {holder} moves "
            f"{model_name}@{SERVING_ALIAS}. Left here only if that run was "
            f"killed; the next promotion breaks it after {stale_s:.0f} s.",
        )
        return "ours"
    except MlflowException as err:
        # The store answers a taken name with RESOURCE_ALREADY_EXISTS, or
        # with RESOURCE_DOES_NOT_EXIST when the lock went away between its
        # failed insert and its read of the existing model.
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
    state = _lock_state(client, name)
    if state is not None and state[0] == holder:
        return "ours"
    return state


def decide(
    mode: str, soup_report: float, compared: Any | None, compared_report: float | None
) -> tuple[bool, str]:
    """The promotion rule, before any lock: ``(promote, reason)``.

    Args:
        mode: ``true``, ``false`` or ``if-better``.
        soup_report: The soup's mIoU on the report split.
        compared: The version serving when the soup was scored (or None).
        compared_report: Its mIoU on the report split (``if-better`` only).
    """
    if mode == "false":
        return False, "promote=false"
    if mode == "if-better" and compared is not None:
        if soup_report > compared_report:
            return True, (
                f"report mIoU {soup_report:.4f} > {compared_report:.4f} of version {compared.version}"
            )
        return False, (
            f"report mIoU {soup_report:.4f} does not beat {compared_report:.4f} "
            f"of serving version {compared.version}"
        )
    if compared is None:
        return True, "no version was serving"
    return True, f"promote={mode}"


def promote(
    model_name: str,
    version: str,
    run_id: str,
    mode: str,
    soup_report: float,
    compared: Any | None,
    compared_report: float | None,
) -> Promotion:
    """Applies :func:`decide`, then moves ``serving`` under the lock and records the move.

    Logs the tags ``soup.promoted``, ``soup.promote_reason`` and
    ``soup.serving_before`` on the active run.
    """
    import mlflow

    from uda.registry import set_alias, source_run_id, verify_loadable

    promoted, reason = decide(mode, soup_report, compared, compared_report)
    if not promoted:
        now = current_serving(model_name)
        before = None if now is None else str(now.version)
    else:
        verify_loadable(model_name, version)  # before the lock: it takes seconds
        with promotion_lock(model_name, run_id):
            now = current_serving(model_name)
            before = None if now is None else str(now.version)
            was = None if compared is None else str(compared.version)
            if mode == "if-better" and before != was:
                promoted = False
                reason = (
                    f"serving moved from version {was or 'none'} to {before or 'none'} "
                    f"(run {source_run_id(now) if now else '?'}) while this soup was scored: "
                    "not compared with it; run the soup again to compare"
                )
            elif before != str(version):
                set_alias(model_name, SERVING_ALIAS, version)
                if now is not None:
                    _record_replaced(model_name, now, version, run_id)
    mlflow.set_tags(
        {
            "soup.promoted": str(promoted).lower(),
            "soup.promote_reason": reason,
            "soup.serving_before": before or "none",
        }
    )
    return Promotion(promoted=promoted, reason=reason, serving_before=before)


def _record_replaced(model_name: str, replaced: Any, version: str, run_id: str) -> None:
    """Tells the replaced version, and the run that made it, who took ``serving``."""
    from mlflow.exceptions import MlflowException

    client = _client()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    note = f"version {version} (run {run_id}) at {when}"
    client.set_model_version_tag(model_name, str(replaced.version), "serving.replaced_by", note)
    from uda.registry import source_run_id

    source_run = source_run_id(replaced)
    if source_run and source_run != run_id:
        try:
            client.set_tag(source_run, "serving.replaced_by", note)
        except MlflowException:
            pass  # that run was deleted: the version's tag still says it


def superseded_note(model_name: str, version: str) -> str | None:
    """When ``serving`` no longer points at ``version``: which version of
    which run holds it now (None when it still points there)."""
    now = current_serving(model_name)
    if now is None or str(now.version) == str(version):
        return None
    from uda.registry import source_run_id

    return f"version {now.version} (run {source_run_id(now)})"
