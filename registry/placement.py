"""Pure placement arithmetic over plain data: no database, no network.

The registry's placement queries, the router's scheduler and the reconciler's planner all use
these functions, so there is exactly one capacity formula in the code base.
"""

from dataclasses import dataclass


def free_slots(slots: int, replica_rows: int) -> int:
    """Replica slots of one node still free for a model.

    Rows in any state (loading or loaded) count against the node's `max_replicas_per_model`;
    a slot count below 1 is treated as 1, as the reference does for `0`.
    """
    return max(0, max(1, slots) - replica_rows)


@dataclass(frozen=True)
class SlotUsage:
    """How many replica slots a node has, and how many rows of one model it already holds."""

    node_id: object
    slots: int
    replica_rows: int

    @property
    def free(self) -> int:
        return free_slots(self.slots, self.replica_rows)


def cluster_capacity(usages) -> int:
    """How many more replicas of a model the candidate nodes can take in total."""
    return sum(usage.free for usage in usages)
