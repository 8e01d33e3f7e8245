"""Tensor parallelism on CPU (`tensor_parallel_size=N`, `-tp N`) with torch.distributed over gloo.

The engine's process is rank 0: it schedules, samples and holds its shard of the model (model/sharding.py). N - 1
worker processes (spawned, so each loads its own shard) hold the other shards and their own KV caches: the same
block count and tables, their own KV heads. Each step rank 0 broadcasts the call it is about to make on its runner
(`execute(batch)`, `score(ids)`, `embed(ids, pooling)`) and makes it; every rank runs the same layers in the same
order, meeting in the all-reduces of the row-parallel projections (model/layers/parallel.py), so the hidden
states are the same everywhere and only rank 0's logits are used. Workers are daemons of the engine's process and
end with it.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import socket
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.cache.kv_cache import COMPRESSED, TURBOQUANT, KVCache
from tokenmill.cache.turboquant import TurboQuant
from tokenmill.config import QuantConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine_args import EngineArgs
from tokenmill.model.build import build_model
from tokenmill.model.layers.parallel import make_row_parallel
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader import Checkpoint, load_checkpoint
from tokenmill.model.runner import ModelRunner
from tokenmill.model.sharding import Shard, shard_checkpoint

logger = logging.getLogger("tokenmill.distributed")
TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer means a rank died: fail, do not hang


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds: rank 0's resolved settings, so every shard is made the same way."""

    args: EngineArgs
    dtype: torch.dtype
    quant: QuantConfig | None
    num_blocks: int
    kv_dtype: torch.dtype
    kv_bits: float | None
    threads: int
    init_method: str
    shard: Shard


def build_shard(ckpt: Checkpoint, shard: Shard, dtype: torch.dtype, quant: QuantConfig | None,
                progress: bool = False) -> LlamaModel:
    """This rank's model: its part of the checkpoint, row-parallel projections. The repacked-weight cache is not
    used (its entries hold whole models)."""
    model = build_model(shard_checkpoint(ckpt, shard), dtype, quant, progress=progress)
    make_row_parallel(model)
    return model


class TensorParallelRunner:
    """Rank 0's runner: tells the workers each call, then makes it; anything else is the local runner's."""

    def __init__(self, runner: ModelRunner, workers: list[mp.Process]) -> None:
        self.runner, self.workers = runner, workers

    def _call(self, method: str, *args: Any) -> Any:
        dist.broadcast_object_list([(method, args)], src=0)
        return getattr(self.runner, method)(*args)

    def execute(self, batch):
        return self._call("execute", batch)

    def score(self, token_ids):
        return self._call("score", list(token_ids))

    def embed(self, token_ids, pooling: str):
        return self._call("embed", list(token_ids), pooling)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def close(self) -> None:
        if dist.is_initialized():
            dist.broadcast_object_list([("stop", ())], src=0)
            dist.destroy_process_group()
        for worker in self.workers:
            worker.join(timeout=10)


def start(args: EngineArgs, engine: LLMEngine, dtype: torch.dtype, quant: QuantConfig | None,
          threads: int) -> TensorParallelRunner:
    """Spawn the workers for rank 0's built `engine` (its model already a shard), join the process group with them
    and put the broadcasting runner in the engine's place."""
    size = args.tensor_parallel_size
    if dist.is_initialized():
        raise ValueError("one tensor-parallel engine per process: close() the other LLM first")
    kv = engine.kv_cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    context = mp.get_context("spawn")
    workers, readiness = [], []
    for rank in range(1, size):
        spec = WorkerSpec(args, dtype, quant, kv.num_blocks, kv.dtype, kv.turbo and kv.turbo.bits, threads,
                          init_method, Shard(rank, size))
        receive, send = context.Pipe(duplex=False)
        worker = context.Process(target=_worker_main, args=(spec, send), daemon=True, name=f"tokenmill-tp{rank}")
        worker.start()
        send.close()
        workers.append(worker)
        readiness.append(receive)
    for rank, (worker, receive) in enumerate(zip(workers, readiness), start=1):
        _wait_ready(rank, worker, receive)
    dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=size, timeout=TIMEOUT)
    logger.info("tensor parallel: %d ranks over gloo, %d threads each", size, threads)
    engine.runner = TensorParallelRunner(engine.runner, workers)
    return engine.runner


def _wait_ready(rank: int, worker: mp.Process, receive) -> None:
    """Until rank `rank` has built its shard; its error (or its death) becomes ours, rather than a wait in the
    process group's rendezvous."""
    died = f"tensor-parallel rank {rank} exited while loading (a spawned process re-runs the main script: run it " \
           "from a file, under `if __name__ == '__main__':`)"
    while not receive.poll(0.2):
        if not worker.is_alive():
            raise RuntimeError(f"{died}; exit code {worker.exitcode}")
    try:
        error = receive.recv()
    except EOFError:
        worker.join(5)
        raise RuntimeError(f"{died}; exit code {worker.exitcode}") from None
    if error:
        raise RuntimeError(f"tensor-parallel rank {rank} failed to load: {error}")


def _worker_main(spec: WorkerSpec, ready) -> None:
    torch.set_num_threads(spec.threads)
    try:
        model = build_shard(load_checkpoint(spec.args.model), spec.shard, spec.dtype, spec.quant)
        offsets = model.key_offsets() if spec.kv_dtype in COMPRESSED else None
        turbo = TurboQuant(model.config.head_dim, spec.kv_bits) if spec.kv_dtype == TURBOQUANT else None
        kv = KVCache(model.config, spec.num_blocks, spec.args.block_size, spec.kv_dtype, offsets, turbo)
        runner = ModelRunner(model, kv)
    except Exception as exc:  # reported to rank 0, which raises it
        ready.send(f"{type(exc).__name__}: {exc}")
        return
    ready.send("")
    dist.init_process_group("gloo", init_method=spec.init_method, rank=spec.shard.rank,
                            world_size=spec.shard.size, timeout=TIMEOUT)
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        method, call_args = message[0]
        if method == "stop":
            break
        getattr(runner, method)(*call_args)
    dist.destroy_process_group()
