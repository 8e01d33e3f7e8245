"""Which replica gets a request: the one that served the longest prefix of its prompt, unless that one is busier.

The prompt's text is cut into blocks of BLOCK_CHARS characters (about 16 tokens, one KV block of the default
size) and each block named by a hash chained over every block before it, so equal hashes mean equal text up to
there, as KV block hashes do. The table remembers, per block hash, the replica a request holding it went to; a
new request goes to the replica of its deepest remembered block, if that replica's queue is at most
`spill_over` requests longer than the shortest one (else the prefix is worth less than the wait); a prefix seen
nowhere goes to the replica that owns the fewest blocks among those within `spill_over` of the least loaded, so
tenants spread evenly over the replicas' caches. Ray Serve LLM's PrefixCacheAffinityRouter and llm-d's
approximate prefix scorer match prefixes this way; this one hashes blocks instead of keeping a character tree, so
a lookup is one dict probe per block.

`PrefixAffinityRouter` plugs this into Ray Serve (its RequestRouter API); `AffinityTable` is the policy alone.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from tokenmill.distributed import live

BLOCK_CHARS = 64
MAX_BLOCKS = 256  # prompts are matched on their first 16k characters
POLICIES = ("prefix", "round-robin")


@dataclass
class HTTPCall:
    """One HTTP request as the ingress hands it to a replica, with the text routing matches prefixes on."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str = ""
    replica: str | None = None  # pinned to this replica (the ingress asks each replica for its /metrics)
    hashes: list[bytes] = field(default_factory=list)


def prompt_text(body: bytes) -> str:
    """The text a request's prompt starts with: a chat's messages (role and content), or a completion's prompt."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    if isinstance(messages := data.get("messages"), list):
        return "".join(f"{m.get('role')}\n{_content(m.get('content'))}\n" for m in messages if isinstance(m, dict))
    prompt = data.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)[:BLOCK_CHARS * MAX_BLOCKS] if prompt else ""


def _content(content) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def block_hashes(text: str) -> list[bytes]:
    hashes, parent = [], b""
    for start in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS) - BLOCK_CHARS + 1, BLOCK_CHARS):
        parent = hashlib.blake2b(parent + text[start:start + BLOCK_CHARS].encode(), digest_size=8).digest()
        hashes.append(parent)
    return hashes


class AffinityTable:
    """Block hash -> replica id, least recently routed out first; and how many blocks each replica owns."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()
        self.owned: Counter[str] = Counter()

    def deepest(self, hashes: Sequence[bytes], replicas: set[str]) -> tuple[str | None, int]:
        """The replica (of `replicas`) holding the longest prefix, and that prefix's length in blocks."""
        for depth in range(len(hashes), 0, -1):
            if (owner := self._owner.get(hashes[depth - 1])) in replicas:
                return owner, depth
        return None, 0

    def record(self, hashes: Sequence[bytes], replica: str) -> None:
        for h in hashes:
            if (previous := self._owner.get(h)) is not None:
                self.owned[previous] -= 1
            self._owner[h] = replica
            self._owner.move_to_end(h)
            self.owned[replica] += 1
        while len(self._owner) > self.max_entries:
            self.owned[self._owner.popitem(last=False)[1]] -= 1


def choose(call: HTTPCall, loads: dict[str, int], table: AffinityTable, policy: str, spill_over: int,
           turn: int) -> str:
    """The replica id for `call` among `loads` (replica id -> requests queued or running there)."""
    if policy == "round-robin":
        return sorted(loads)[turn % len(loads)]
    least = min(loads.values())
    owner, _ = table.deepest(call.hashes, set(loads))
    if owner is not None and loads[owner] - least <= spill_over:
        return owner
    if not call.hashes:  # nothing to cache: the least loaded
        return random.choice([r for r, n in loads.items() if n == least])
    # a new prefix: to the replica holding the fewest blocks, among those not too busy, so that the prefixes (the
    # tenants) spread evenly and each replica's cache holds its share
    near = [r for r, n in loads.items() if n - least <= spill_over]
    return min(near, key=lambda r: (table.owned[r], loads[r], random.random()))


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve's request router for the engine replicas (runs in the ingress, which holds their handle)."""


    def initialize_state(self, policy: str = "prefix", spill_over: int = 4) -> None:
        self.policy = policy
        self.spill_over = spill_over
        self.table = AffinityTable()
        self.turn = 0

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live.REPLICA_IDS[:] = sorted(r.replica_id.unique_id for r in replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        call = _call_of(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if call is not None and call.replica is not None:
            return [[by_id[call.replica]]] if call.replica in by_id else []
        if call is None or not by_id:
            return [candidate_replicas]
        loads = {rid: self.replica_queue_len_cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        chosen = choose(call, loads, self.table, self.policy, self.spill_over, self.turn)
        self.turn += 1
        return [[by_id[chosen]], [r for rid, r in by_id.items() if rid != chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        if (call := _call_of(pending_request)) is not None and call.replica is None:
            self.table.record(call.hashes, replica_id.unique_id)


def _call_of(pending_request: PendingRequest | None) -> HTTPCall | None:
    if pending_request is None:
        return None
    # by class name: Ray pickles the router and the ingress by value, each with its own copy of HTTPCall
    return next((a for a in pending_request.args if type(a).__name__ == HTTPCall.__name__), None)
