"""List-then-watch of the resources the FineTuneJob reconciler reads (handlers.WATCHED), into its cache.

One thread per resource and namespace, as client-go's reflector: LIST (every object is delivered, and
objects known from before but no longer listed are delivered as deleted), then WATCH from the list's
resourceVersion with bookmarks; a watch that ends is resumed from the last resourceVersion seen, one the
server no longer has (410 Gone) starts over with a LIST; errors back off (1 s doubling to 30 s).

These watches were kopf's before (an index handler and an event handler per resource): kopf's per-event
machinery (handler state, kwargs, patches, a task per object) cost about half of the operator's CPU while
100 jobs started, for events that only fill a cache and queue a job. kopf still runs the handlers that need
it (RewardGrader checks, TrainingSessions).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.rest import ApiException

Json = dict[str, Any]
LOG = logging.getLogger("whetstone.operator")

# The server ends a watch after this long (a random part added, as client-go does, so that watches do not all
# end at once); the watch then resumes from its last resourceVersion.
WATCH_SECONDS = 300
BACKOFF = (1.0, 30.0)


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class Informer(threading.Thread):
    """Delivers every object of one resource (in one namespace, or all) as (event type, object):
    "ADDED"/"MODIFIED" for a listed or changed object, "DELETED" for one gone. `listed` is set once the first
    LIST was delivered."""

    def __init__(
        self,
        name: str,
        list_objects: Callable[[], tuple[list[Json], str]],
        watch_objects: Callable[[str, int], Iterator[Json]],
        deliver: Callable[[str, Json], None],
        stopping: threading.Event,
    ) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.what = name
        self.list_objects, self.watch_objects, self.deliver = list_objects, watch_objects, deliver
        self.stopping = stopping
        self.listed = threading.Event()
        # The last object delivered, by uid: what a later LIST no longer holds was deleted meanwhile.
        self._known: dict[str, Json] = {}
        self._version: str | None = None  # None: LIST (again)

    def run(self) -> None:
        delay = BACKOFF[0]
        while not self.stopping.is_set():
            try:
                if self._version is None:
                    self._version = self._list()
                    self.listed.set()
                self._watch(self._version)
                delay = BACKOFF[0]
            except Gone:
                self._version = None
            except Exception as e:  # noqa: BLE001 - a watch must outlive any error: log, back off, resume
                if self.stopping.is_set():
                    return
                LOG.warning("watch of %s failed (again in %.0f s): %s", self.what, delay, _short(e))
                if isinstance(e, ApiException) and e.status == 410:
                    self._version = None
                self.stopping.wait(delay)
                delay = min(delay * 2, BACKOFF[1])

    def _list(self) -> str:
        items, version = self.list_objects()
        listed = {obj["metadata"]["uid"]: obj for obj in items}
        for uid, obj in list(self._known.items()):
            if uid not in listed:
                self._deliver("DELETED", obj)
        for obj in items:
            self._deliver("MODIFIED" if obj["metadata"]["uid"] in self._known else "ADDED", obj)
        return version

    def _watch(self, since: str) -> None:
        """Deliver the watch's events; the resourceVersion of each (bookmarks too) is where the next watch
        starts, also after a dropped connection."""
        for event in self.watch_objects(since, WATCH_SECONDS):
            if self.stopping.is_set():
                return
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise RuntimeError(f"watch error: {obj.get('message') or obj}")
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._deliver(kind, obj)
            self._version = (obj.get("metadata") or {}).get("resourceVersion") or self._version

    def _deliver(self, kind: str, obj: Json) -> None:
        # The field managers' bookkeeping (a third of a pod's JSON) is read by nothing the cache serves.
        obj["metadata"].pop("managedFields", None)
        uid = obj["metadata"].get("uid", "")
        if kind == "DELETED":
            self._known.pop(uid, None)
        else:
            self._known[uid] = obj
        try:
            self.deliver(kind, obj)
        except Exception:  # noqa: BLE001 - one bad object must not stop the watch of all others
            LOG.exception("watch of %s: delivering %s failed", self.what, obj["metadata"].get("name"))


def _short(e: Exception) -> str:
    if isinstance(e, ApiException):
        return f"{e.status} {e.reason}"
    return " ".join(str(e).split())[:300]
