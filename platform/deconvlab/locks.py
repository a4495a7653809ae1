"""One promotion at a time per registered model, across hosts: a lock that the store's database holds.

The lock of registered model ``NAME`` is a row in the registry itself: another registered model,
``NAME.promotion-lock``. Creating it acquires the lock. The registry's database refuses a second registered
model of one name (it is the table's primary key), so of two processes creating it at once exactly one
succeeds, on whatever host each runs and whether it reaches the database directly (``sqlite:///``,
``postgresql://``) or through a tracking server, with or without authentication (any authenticated user may
create a registered model and becomes its owner). Deleting the row releases the lock. Nothing is kept on a
file system, so hosts that share none are serialised as well as two processes on one machine.

A promotion that dies while holding the lock (SIGKILL, a lost pod) leaves the row behind. Every lock row
carries a random token; a waiter that sees the same token for ``lease_s`` seconds (measured on its own
clock, so no clocks need to agree) deletes the row and competes again. The decide-and-write step it guards
takes about a second, far below the 60 s lease.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from deconvlab.access import refusal, refusals_named
from deconvlab.errors import UserError, first_line

if TYPE_CHECKING:  # MLflow is imported where it is used: it costs 1-2 s, which `deconvlab runs` does without
    from mlflow.tracking import MlflowClient

LOCK_SUFFIX = ".promotion-lock"
TOKEN_TAG, HOLDER_TAG = "deconvlab.lock_token", "deconvlab.lock_holder"
LEASE_S = 60.0
POLL_S = 0.2

log = logging.getLogger(__name__)


def lock_name(name: str) -> str:
    """The registered model that serves as the promotion lock of ``name``."""
    return f"{name}{LOCK_SUFFIX}"


def is_lock_name(name: str) -> bool:
    return name.endswith(LOCK_SUFFIX)


def _holder() -> str:
    """Who holds a lock, for the message a waiter sees: MLflow user, OS user, host and process."""
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username or os.environ.get("USER") or "?"
    return f"{user} on {socket.gethostname()} (pid {os.getpid()})"


def _lock_state(client: MlflowClient, lock: str) -> tuple[str, str] | None:
    """``(token, holder)`` of the lock row, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return model.tags.get(TOKEN_TAG, ""), model.tags.get(HOLDER_TAG, "unknown")


def _delete(client: MlflowClient, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # already gone: released or broken by someone else
        client.delete_registered_model(lock)


def _break(client: MlflowClient, lock: str, stale: tuple[str, str], lease_s: float) -> None:
    """Delete a lock row whose token has not changed for ``lease_s`` seconds (its holder died)."""
    from mlflow.exceptions import MlflowException

    log.warning("breaking the promotion lock %s held by %s: unchanged for %g s", lock, stale[1], lease_s)
    try:
        if _lock_state(client, lock) == stale:
            client.delete_registered_model(lock)
    except MlflowException as exc:
        if refusal(exc) is None:
            raise
        raise UserError(f"the promotion lock {lock!r} of {stale[1]} has not changed for {lease_s:g} s and this "
                        "user may not delete it", f"registered model {lock!r} on {client.tracking_uri}",
                        "if no promotion is running, its owner or an admin of the server deletes that registered "
                        "model") from None


def _acquire(client: MlflowClient, lock: str, token: str, timeout_s: float, lease_s: float) -> None:
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + timeout_s
    seen, since = None, 0.0
    while True:
        try:
            client.create_registered_model(lock, tags={TOKEN_TAG: token, HOLDER_TAG: _holder()},
                                           description="deconvlab promotion lock: deleted when the promotion ends")
            return
        except MlflowException as exc:
            # MLflow's SQL store answers a taken name by reading that model back for its message: when the
            # holder released in between, the create fails "not found" instead. Both mean: look and retry.
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        state = _lock_state(client, lock)
        if state is None:
            continue  # released in between: try again at once
        if state[0] == token:
            return  # our own create went through and a retry of it found the row
        now = time.monotonic()
        if state != seen:
            seen, since = state, now
        elif now - since >= lease_s:
            _break(client, lock, state, lease_s)
            continue
        if now >= deadline:
            raise UserError(f"another promotion holds the lock {lock!r}: {state[1]}",
                            f"registered model {lock!r} on {client.tracking_uri}",
                            f"wait for it to finish; a lock left by a dead promotion is broken after {lease_s:g} s")
        time.sleep(POLL_S * (1 + random.random()))  # jitter: waiters do not poll in step


def _release(client: MlflowClient, lock: str, token: str) -> None:
    try:
        state = _lock_state(client, lock)
        if state is not None and state[0] == token:
            _delete(client, lock)
    except Exception as exc:  # noqa: BLE001 - the promotion itself is done; the lease frees the lock
        log.warning("could not release the promotion lock %s (%s): it is broken after %g s", lock,
                    first_line(exc), LEASE_S)


@contextlib.contextmanager
def registry_lock(client: MlflowClient, name: str, timeout_s: float = 120.0,
                  lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` for the block.

    A refusal by the tracking server inside the block (a user with READ on ``name`` adding a version or
    moving an alias) becomes one :class:`~deconvlab.errors.AccessRefused` naming the model.

    Args:
        client: a client of the store that holds the registry.
        name: the registered model.
        timeout_s: how long to wait for another promotion.
        lease_s: how long a lock row may stay unchanged before a waiter breaks it.

    Raises:
        UserError: another promotion held the lock for ``timeout_s``.
    """
    lock, token = lock_name(name), uuid.uuid4().hex
    with refusals_named(f"registered model {lock!r} (the promotion lock of {name!r})", client.tracking_uri):
        _acquire(client, lock, token, timeout_s, lease_s)
    try:
        with refusals_named(f"registered model {name!r}", client.tracking_uri):
            yield
    finally:
        _release(client, lock, token)
