"""Tensor parallelism on CPU (`tensor_parallel_size=N`, `-tp N`) with torch.distributed over gloo.

The engine's process is rank 0: it schedules, samples and holds its shard of the model (model/sharding.py). N - 1
worker processes (`python -m tokenmill.distributed.tensor_parallel`, each loading its own shard) hold the other
shards and their own KV caches: the same block count and tables, their own KV heads. Each step rank 0 broadcasts
the call it is about to make on its runner (`execute(batch)`, `score(ids)`, `embed(ids, pooling)`) and makes it;
every rank runs the same layers in the same order, meeting in the all-reduces of the row-parallel projections
(model/layers/parallel.py), so the hidden states are the same everywhere and only rank 0's logits are used.
Workers end with the engine's process.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import pickle
import signal
import socket
import subprocess
import sys
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
from tokenmill.model.loader.checkpoint import Checkpoint, load_checkpoint
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
    """Rank 0's runner: tells the workers each call, then makes it; anything else is the local runner's.

    The workers start with the first call, or with start(), in the process that runs the steps: `tokenmill serve`
    builds the model in its API process and forks the engine core from it (engine/core_proc.py), and a process
    group cannot cross a fork."""

    def __init__(self, runner: ModelRunner, specs: list[WorkerSpec]) -> None:
        self.runner, self.specs = runner, specs
        self.workers: list[subprocess.Popen] = []

    def start(self) -> None:
        """Start the worker processes and join the process group with them (once)."""
        if self.workers:
            return
        if dist.is_initialized():
            raise ValueError("one tensor-parallel engine per process: close() the other LLM first")
        for spec in self.specs:  # python -m: a worker never re-runs this process's main script
            worker = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      preexec_fn=_die_with_parent)
            worker.stdin.write(pickle.dumps(spec))
            worker.stdin.close()
            self.workers.append(worker)
        for spec, worker in zip(self.specs, self.workers):
            answer = worker.stdout.readline().decode().strip()  # its model is built, or it failed
            if answer != "ready":
                self.close()
                raise RuntimeError(f"tensor-parallel rank {spec.shard.rank} failed to load: "
                                   f"{answer or f'exit code {worker.wait()}'}")
        first = self.specs[0]
        dist.init_process_group("gloo", init_method=first.init_method, rank=0, world_size=first.shard.size,
                                timeout=TIMEOUT)
        logger.info("tensor parallel: %d ranks over gloo, %d threads each", first.shard.size, first.threads)

    def _call(self, method: str, *args: Any) -> Any:
        self.start()
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
        """Stop the workers (they also die with this process)."""
        if dist.is_initialized():
            dist.broadcast_object_list([("stop", ())], src=0)
            dist.destroy_process_group()
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
        self.workers = []


def attach(args: EngineArgs, engine: LLMEngine, dtype: torch.dtype, quant: QuantConfig | None,
           threads: int) -> None:
    """Put a broadcasting runner in rank 0's `engine` (its model already a shard), for workers made the same way."""
    size = args.tensor_parallel_size
    kv = engine.kv_cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    specs = [WorkerSpec(args, dtype, quant, kv.num_blocks, kv.dtype, kv.turbo and kv.turbo.bits, threads, init_method,
                        Shard(rank, size)) for rank in range(1, size)]
    engine.runner = TensorParallelRunner(engine.runner, specs)


def _die_with_parent() -> None:
    """In the worker, before it runs: the kernel kills it when its parent (rank 0's process) ends."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(spec: WorkerSpec) -> None:
    torch.set_num_threads(spec.threads)
    try:
        model = build_shard(load_checkpoint(spec.args.model), spec.shard, spec.dtype, spec.quant)
        offsets = model.key_offsets() if spec.kv_dtype in COMPRESSED else None
        turbo = TurboQuant(model.config.head_dim, spec.kv_bits) if spec.kv_dtype == TURBOQUANT else None
        kv = KVCache(model.config, spec.num_blocks, spec.args.block_size, spec.kv_dtype, offsets, turbo)
        runner = ModelRunner(model, kv)
    except Exception as exc:  # told to rank 0, which raises it
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        return
    print("ready", flush=True)
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


if __name__ == "__main__":
    _worker_main(pickle.load(sys.stdin.buffer))
