"""Ray tasks consumed as they finish: the one loop of the confirmation and the source models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import ray

Key = TypeVar("Key")


def as_they_finish(running: dict[Any, Key], bar: Any) -> Iterator[tuple[Key, Any]]:
    """``(key, result)`` of each submitted task as soon as it is done, until none is left.

    Every task is submitted before the first wait: Ray's scheduling runs as many at once as the
    cluster's resources fit (each task asks for its own) and queues the rest.

    Args:
        running: object ref -> the caller's key for it; emptied as results arrive.
        bar: a tqdm bar, refreshed while tasks run so that its elapsed time moves.
    """
    while running:
        done, _ = ray.wait(list(running), num_returns=1, timeout=5.0)
        bar.refresh()
        for ref in done:
            yield running.pop(ref), ray.get(ref)
