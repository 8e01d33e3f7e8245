"""The replica router's policy (prefix affinity, spill-over, round robin) and the ingress's helpers, without Ray
running: the policy is plain functions over replica ids and loads."""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'tokenmill[distributed]')")

from tokenmill.distributed.relay import merge_expositions  # noqa: E402
from tokenmill.distributed.replicas import ReplicaSet  # noqa: E402
from tokenmill.distributed.routing import (  # noqa: E402
    BLOCK_CHARS,
    AffinityTable,
    HTTPCall,
    block_hashes,
    choose,
    prompt_text,
)

SYSTEM = "You are the support assistant of a company that sells garden tools. " * 4


def call(text: str) -> HTTPCall:
    return HTTPCall("POST", "/v1/completions", b"", [], b"", text, hashes=block_hashes(text))


def test_block_hashes_name_whole_prefixes():
    a, b = block_hashes(SYSTEM + "user one asks"), block_hashes(SYSTEM + "user two asks")
    assert len(a) == len(SYSTEM + "user one asks") // BLOCK_CHARS
    common = len(SYSTEM) // BLOCK_CHARS
    assert a[:common] == b[:common]
    # a block equal in itself but after a different prefix gets another hash (chained, as KV block hashes)
    assert block_hashes("x" * BLOCK_CHARS + SYSTEM)[1] != block_hashes("y" * BLOCK_CHARS + SYSTEM)[1]
    assert block_hashes("short") == []


def test_prompt_text_of_chat_and_completion_bodies():
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert prompt_text(json.dumps(chat).encode()) == "system\nBe brief.\nuser\nHi\n"
    assert prompt_text(json.dumps({"prompt": "Once"}).encode()) == "Once"
    assert prompt_text(json.dumps({"prompt": [1, 2, 3]}).encode()) == "[1, 2, 3]"
    assert prompt_text(b"not json") == "" and prompt_text(b"[1]") == ""


def test_shared_prefixes_stick_to_one_replica_and_spill_over_when_it_is_busy():
    random.seed(0)
    table = AffinityTable()
    loads = {"a": 0, "b": 0, "c": 0}
    first = choose(call(SYSTEM + "first user"), loads, table, "prefix", spill_over=2, turn=0)
    table.record(call(SYSTEM + "first user").hashes, first)
    for user in range(10):
        assert choose(call(SYSTEM + f"user {user}"), loads, table, "prefix", 2, user) == first
    busy = {**loads, first: 3}  # 3 more than the least loaded, over the spill-over of 2
    assert choose(call(SYSTEM + "late user"), busy, table, "prefix", 2, 0) != first
    # the owner gone from the replica set: the request goes elsewhere, never to a dead id
    assert choose(call(SYSTEM + "x"), {r: 0 for r in loads if r != first}, table, "prefix", 2, 0) != first


def test_new_prefixes_spread_over_replicas_and_round_robin_cycles():
    table = AffinityTable()
    assert choose(call("short"), {"a": 5, "b": 1, "c": 3}, table, "prefix", 4, 0) == "b"  # nothing to cache
    assert choose(call("fresh " * 40), {"a": 6, "b": 1, "c": 3}, table, "prefix", 4, 0) == "b"
    loads = {"a": 0, "b": 0}
    for tenant in range(8):  # 8 new tenants, equal loads: 4 each, whatever the order of arrival
        text = f"tenant {tenant} " * 30
        table.record(call(text).hashes, choose(call(text), loads, table, "prefix", 4, tenant))
    assert table.owned["a"] == table.owned["b"] > 0
    busy = {"a": 2, "b": 9}  # b owns no more than a but is too busy: a takes the new prefix
    assert choose(call("another " * 30), busy, table, "prefix", 4, 0) == "a"
    loads = {"b": 0, "a": 9, "c": 0}
    assert [choose(call(SYSTEM), loads, table, "round-robin", 4, turn) for turn in range(4)] == ["a", "b", "c", "a"]


def test_affinity_table_forgets_the_least_recently_routed():
    table = AffinityTable(max_entries=4)
    old, new = block_hashes("o" * BLOCK_CHARS * 3), block_hashes("n" * BLOCK_CHARS * 3)
    table.record(old, "a")
    table.record(new, "b")
    assert table.deepest(new, {"a", "b"}) == ("b", 3)
    assert table.deepest(old, {"a", "b"}) == ("a", 3)  # its deepest block is still there (the first two are not)
    assert table.owned == {"a": 1, "b": 3}
    table.record(block_hashes("z" * BLOCK_CHARS), "c")
    assert table.deepest(old, {"a", "b", "c"}) == (None, 0)
    table.record(new, "a")  # routed elsewhere now: ownership moves
    assert table.owned == {"a": 3, "b": 0, "c": 1}


def test_metrics_of_replicas_merge_with_a_replica_label():
    text = ('# HELP tokenmill:num_requests_running Sequences in the running batch.\n'
            '# TYPE tokenmill:num_requests_running gauge\n'
            'tokenmill:num_requests_running{model_name="m"} %d\n')
    merged = merge_expositions({"r1": text % 2, "r2": text % 5}).decode()
    assert merged.count("# TYPE tokenmill:num_requests_running gauge") == 1
    assert 'tokenmill:num_requests_running{model_name="m",replica="r1"} 2.0' in merged
    assert 'tokenmill:num_requests_running{model_name="m",replica="r2"} 5.0' in merged


@pytest.mark.parametrize("replica_set,message", [
    (ReplicaSet(0), "--replicas must be >= 1"),
    (ReplicaSet(2, min_replicas=1), "give --min-replicas and --max-replicas together"),
    (ReplicaSet(5, min_replicas=1, max_replicas=4), "need 0 <= --min-replicas <= --replicas <= --max-replicas"),
])
def test_bad_replica_settings(replica_set, message):
    with pytest.raises(ValueError, match=message):
        replica_set.deployment_options()


def test_autoscaling_bounds_reach_ray_serve():
    options = ReplicaSet(2, min_replicas=1, max_replicas=4).deployment_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                             "target_ongoing_requests": 8.0}
    assert "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0}
    assert ReplicaSet(2, gpus=1).deployment_options()["ray_actor_options"]["num_gpus"] == 1  # the GPU path
