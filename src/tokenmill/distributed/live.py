"""The engine replicas the request router in this process knows, for the ingress's /metrics.

A module of its own, always named as a module (`live.REPLICA_IDS`): Ray pickles the ingress and the router by
value, and a by-value function gets its own copy of its module's globals (a class attribute set by one copy is
not seen by the other), but modules travel by reference, so this list is the one list of the process.
"""
from __future__ import annotations

REPLICA_IDS: list[str] = []
