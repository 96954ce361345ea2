"""What a cluster view has moved to each node and not heard from there since."""

from __future__ import annotations


class MovesUnderWay:
    """The streams a cluster view (an edge's, a client's) moved to each node and has not
    heard from there since, with the tokens each must prefill again there (its prompt and
    its outputs so far). A node prefills moved streams one after another, ahead of fresh
    prompts (p3/engine/scheduler.py), so what a moved stream waits for is the moves sent
    there before it, more than the node's load: the moves of a node's death go, each, to the
    replica with the least of this work, then the least loaded."""

    def __init__(self) -> None:
        self._by_node: dict[str, dict[str, int]] = {}  # node id -> request id -> tokens
        self._node_of: dict[str, str] = {}

    def add(self, node_id: str, request_id: str, num_tokens: int) -> None:
        self.drop(request_id)
        self._by_node.setdefault(node_id, {})[request_id] = num_tokens
        self._node_of[request_id] = node_id

    def drop(self, request_id: str) -> None:
        """It streams again (its prefill is done), ended, or moves on."""
        node_id = self._node_of.pop(request_id, None)
        if node_id is not None:
            self._by_node[node_id].pop(request_id, None)

    def tokens(self, node_id: str) -> int:
        return sum(self._by_node.get(node_id, {}).values())
