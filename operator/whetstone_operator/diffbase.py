"""kopf's change detection, only for the kinds whose handlers need it.

For every watch event kopf builds the object's "essence" (a deep copy of the body without its status and
system fields, then a second copy) to find what changed since the last handled state. Only change-detecting
handlers (on.create / on.update / on.field, timers and daemons) read it: the TrainingSession handlers
(sessions.py). The FineTuneJob side only watches (index and event handlers fill the cache, handlers.py), so
for its jobs, pods, ConfigMaps, Services, NetworkPolicies, Checkpoints, RewardGraders and Workloads the copies
were pure cost: at start-up with 100 jobs they were the largest part of kopf's CPU time. kopf documents the
diff-base storage as replaceable (settings.persistence.diffbase_storage); this one keeps kopf's default
(annotations) for the listed kinds and gives every other kind an empty essence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import kopf

# Kinds with change-detecting handlers (kept in step with sessions.register: tests/test_operator_runtime.py).
CHANGE_DETECTED_KINDS = frozenset({"TrainingSession"})


class ChangeDetectedOnly(kopf.AnnotationsDiffBaseStorage):
    def __init__(self, kinds: Iterable[str] = CHANGE_DETECTED_KINDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = frozenset(kinds)

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if body.get("kind") not in self.kinds:
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)
