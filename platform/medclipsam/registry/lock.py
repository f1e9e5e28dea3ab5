"""Mutual exclusion for moving an alias, held in the registry itself.

MLflow has no compare-and-set for aliases, but creating a registered model is atomic: a name can
be created once, and a second create fails. The lock is a registered model named
``<model>.promotion-lock``, created on entry and deleted on exit. Every promotion of a model reads
the alias holder, compares and moves the alias inside it, so two promotions cannot interleave
between the read and the move. A lock left by a killed process expires after ``stale_after``
seconds.
"""

from __future__ import annotations

import os
import random
import socket
import time

from ..errors import ModelError

LOCK_TAG = "medclipsam.lock"


def lock_name(model: str) -> str:
    return f"{model}.promotion-lock"


def is_lock(registered_model) -> bool:
    return LOCK_TAG in (registered_model.tags or {})


class AliasLock:
    def __init__(self, client, model: str, timeout: float = 300.0, stale_after: float = 600.0) -> None:
        self.client, self.model, self.name = client, model, lock_name(model)
        self.timeout, self.stale_after = timeout, stale_after
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"

    def __enter__(self) -> AliasLock:
        deadline = time.monotonic() + self.timeout
        wait = 0.05
        while True:
            try:
                self.client.create_registered_model(self.name, tags={
                    LOCK_TAG: self.owner, "expires": f"{time.time() + self.stale_after:.0f}"},
                    description=f"held while a promotion of {self.model} moves an alias; delete it if no "
                                "promotion is running")
                return self
            except Exception as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise ModelError(f"cannot take the promotion lock of {self.model} ({exc})") from exc
            holder = self._holder()
            if holder is not None and float(holder.get("expires", "0")) < time.time():
                self._delete()  # its owner died holding it
                continue
            if time.monotonic() > deadline:
                raise ModelError(f"another promotion of {self.model} holds its lock "
                                 f"({(holder or {}).get(LOCK_TAG, 'unknown')}); try again, or delete the registered "
                                 f"model {self.name} if no promotion is running")
            time.sleep(wait * (1 + random.random()))
            wait = min(wait * 2, 1.0)

    def __exit__(self, *exc_info) -> None:
        holder = self._holder()
        if holder is not None and holder.get(LOCK_TAG) == self.owner:
            self._delete()

    def _holder(self) -> dict | None:
        try:
            return dict(self.client.get_registered_model(self.name).tags or {})
        except Exception:
            return None

    def _delete(self) -> None:
        try:
            self.client.delete_registered_model(self.name)
        except Exception as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
