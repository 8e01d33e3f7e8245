"""KV cache events of a real `tokenmill serve --kv-events-config ...`, read by a ZeroMQ subscriber that decodes them
with vLLM's own message types (msgspec structs, as in vLLM's kv_events_subscriber example): what a KV-aware router
(llm-d, Dynamo) would receive."""
from __future__ import annotations

import hashlib
import json
from array import array

import httpx
import msgspec
import pytest
import zmq

from serverproc import start_server, stop, wait_healthy
from tokenmill.bench.peers import free_port
from tokenmill.engine.kv_events import KVEventsConfig


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def documented_hashes(token_ids: list[int], block_size: int = 16) -> list[int]:
    """The hash README and cache/kv_events.py document, computed here from the tokens alone."""
    parent, out = b"tokenmill-prefix-v1", []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[start:start + block_size]).tobytes())
        parent = h.digest()
        out.append(int.from_bytes(parent[:8], "big"))
    return out


def test_config_is_vllms_and_refuses_what_it_does_not_know():
    assert KVEventsConfig.parse(None) is None
    assert KVEventsConfig.parse('{"enable_kv_cache_events": false, "publisher": "zmq"}') is None
    assert KVEventsConfig.parse({"enable_kv_cache_events": True, "publisher": "zmq"}).endpoint == "tcp://*:5557"
    with pytest.raises(ValueError, match="does not take endpoint_url"):
        KVEventsConfig.parse({"enable_kv_cache_events": True, "endpoint_url": "x"})
    with pytest.raises(ValueError, match="publisher must be zmq or null"):
        KVEventsConfig.parse({"enable_kv_cache_events": True, "publisher": "kafka"})


def test_each_engine_of_several_publishes_on_its_own_ports():
    config = KVEventsConfig.parse({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
                                   "replay_endpoint": "tcp://127.0.0.1:5600"})
    assert (config.for_rank(2).endpoint, config.for_rank(2).replay_endpoint) == ("tcp://*:5559", "tcp://127.0.0.1:5602")
    assert config.for_rank(0) == config
    ipc = KVEventsConfig.parse({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "ipc:///tmp/kv"})
    assert ipc.for_rank(0).endpoint == "ipc:///tmp/kv"
    with pytest.raises(ValueError, match="several engines need tcp://HOST:PORT"):
        ipc.for_rank(1)


def test_stored_and_removed_blocks_reach_a_subscriber(tmp_path):
    port, replay_port = free_port(), free_port()
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}",
              "replay_endpoint": f"tcp://127.0.0.1:{replay_port}", "topic": "kv-events"}
    # 4 MiB: 11 blocks of 16 tokens for this model, so a few prompts evict the first one's blocks
    srv = start_server(tmp_path, "--kv-events-config", json.dumps(config), "--kv-cache-memory", "4MiB")
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv-events")
    try:
        wait_healthy(srv)
        prompts = [f"Story {i}: once upon a time, in a land far away, there lived a dragon who loved to read "
                   f"books about the sea and the stars, and every night it" for i in range(5)]
        ids = [httpx.post(f"{srv.url}/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
        batches, seqs = [], []
        for prompt in prompts:
            r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
        while sub.poll(2000):
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv-events"
            seqs.append(int.from_bytes(seq, "big"))
            batches.append(decoder.decode(payload))
        assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap
        replay = context.socket(zmq.DEALER)  # what came before we subscribed (AllBlocksCleared at least)
        replay.connect(f"tcp://127.0.0.1:{replay_port}")
        replay.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while replay.poll(5000):
            _, seq, payload = replay.recv_multipart()
            if not payload:
                break
            replayed.append((int.from_bytes(seq, "big"), decoder.decode(payload)))
        assert [s for s, _ in replayed] == list(range(seqs[-1] + 1))
        assert [b for _, b in replayed[seqs[0]:]] == batches  # the buffer holds what was published
        events = [e for _, b in replayed for e in b.events]
        assert isinstance(events[0], AllBlocksCleared)
        stored = [e for e in events if isinstance(e, BlockStored)]
        first = documented_hashes(ids[0])
        assert [e.block_hashes[0] for e in stored[:len(first)]] == first
        assert stored[0].parent_block_hash is None and stored[1].parent_block_hash == first[0]
        assert stored[0].token_ids == ids[0][:16] and stored[0].block_size == 16
        removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
        assert removed & set(first), "the first prompt's blocks were evicted, and said so"
        assert removed <= {h for e in stored for h in e.block_hashes}  # only what was stored is removed
    finally:
        context.destroy(linger=0)
        stop(srv)
