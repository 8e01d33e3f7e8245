"""The engine replicas the request router in this process knows, for the HTTP front's /metrics.

A module of its own, always named as a module (`live.REPLICA_IDS`): Ray builds the router from a by-value pickle,
whose functions get their own copy of their module's globals (a class attribute set there is not seen by this
process's import of routing.py), but modules travel by reference, so this list is the one list of the process.
"""
from __future__ import annotations

REPLICA_IDS: list[str] = []
