"""Which node delivers which partition: a node's partition-id is its own claim, so the first
aggregated claim binds the two, and neither may deliver for another afterwards (README, "One node's
influence is bounded"). The binding is kept in the checkpoint."""

from __future__ import annotations


class PartitionBinding(dict[int, int]):
    """node id -> the partition bound to it: the one its first aggregated reply claimed."""

    def refusal(self, node: int, partition: int) -> str | None:
        """Why `node` may not deliver `partition`: either is bound to another."""
        bound = self.get(node)
        if bound is not None and bound != partition:
            return f"partition-id {partition}, but node {node} is bound to partition {bound}, the one it first delivered"
        owner = next((other for other, held in self.items() if held == partition and other != node), None)
        if owner is not None:
            return f"partition-id {partition} is bound to node {owner}, which first delivered it"
        return None
