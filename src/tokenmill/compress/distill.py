"""Knowledge distillation into a depth-pruned student, on this machine's CPU within a time budget.

The student starts as the teacher with its least influential layers dropped (compress/prune.py), in float32,
and trains on the teacher's next-token distributions: at every position, KL(teacher || student) over the
teacher's top-k tokens plus one bucket for all other tokens (a true divergence of the two distributions so
coarsened: the student is pulled to the teacher's top-k probabilities and to its tail mass, not just up on the
top-k). The teacher is the served engine itself (packed weights, native
kernels, no gradients); the student runs the same modules on the PyTorch path, which autograd can follow. Training
text: the shipped calibration text, user files, and the teacher's own samples continuing windows of it. The
student's KL to the teacher on the held-out text is measured before and after, so the gain of distillation over
pruning alone is on record.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tokenmill.cache.kv_cache import KVCache
from tokenmill.compress.kld import KLDResult, kl_divergence
from tokenmill.compress.prune import block_influence, drop_layers, least_influential, parameter_count
from tokenmill.compress.quantize import float_weights
from tokenmill.llm import LLM
from tokenmill.model.build import build_model, checkpoint_state
from tokenmill.model.loader.checkpoint import Checkpoint
from tokenmill.model.runner import ModelRunner
from tokenmill.quant.checkpoint import save_checkpoint
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class DistillOptions:
    params_fraction: float = 0.7  # the student's parameters as a fraction of the teacher's
    minutes: float = 10.0  # training time (pruning, sampling and evaluation come on top)
    seq_len: int = 256
    top_k: int = 64
    lr: float = 1e-4
    sample_tokens: int = 16384  # teacher samples added to the training text
    eval_tokens: int = 2048  # of the held-out text, for the KL before and after
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.params_fraction <= 1:
            raise ValueError(f"params_fraction must be in (0, 1], got {self.params_fraction}")
        if self.minutes < 0 or self.seq_len < 2 or self.top_k < 1 or self.lr <= 0:
            raise ValueError("minutes >= 0, seq_len >= 2, top_k >= 1 and lr > 0 are required")


@dataclass
class DistillResult:
    teacher_params: int
    student_params: int
    dropped_layers: list[int]
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    pruned: KLDResult | None = None  # the student against the teacher before training
    distilled: KLDResult | None = None  # and after


def layers_to_drop(params: int, per_layer: int, fraction: float, num_layers: int) -> int:
    """Fewest layers whose removal brings `params` to at most `fraction` of itself (at most all but two)."""
    return min(num_layers - 2, max(0, math.ceil((params - fraction * params) / per_layer)))


def teacher_samples(teacher: LLM, ids: Sequence[int], num_tokens: int, seed: int, prompt_len: int = 32,
                    new_tokens: int = 224) -> list[list[int]]:
    """Prompt + continuation sequences: the teacher continuing windows of `ids` (temperature 1)."""
    count = -(-num_tokens // new_tokens)
    rng = random.Random(seed)
    starts = [rng.randrange(max(1, len(ids) - prompt_len)) for _ in range(count)]
    prompts = [{"prompt_token_ids": list(ids[s:s + prompt_len])} for s in starts]
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, seed=seed, ignore_eos=True)
    outs = teacher.generate(prompts, params, use_tqdm=False) if count else []
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs]


def topk_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over k tokens and a bucket for the rest: log-probabilities
    [positions, k] of the teacher's top-k tokens under each model."""
    def with_rest(logp: torch.Tensor) -> torch.Tensor:
        rest = (1 - logp.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
        return torch.cat((logp, rest), -1)

    teacher, student = with_rest(teacher_logp), with_rest(student_logp)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def distill(teacher: LLM, train_ids: Sequence[Sequence[int]], eval_ids: Sequence[int], out: Path,
            options: DistillOptions = DistillOptions(), progress: bool = False) -> DistillResult:
    """Prune the teacher to a student, train it for options.minutes on `train_ids` (sequences of token ids), and
    write it to `out` (a tokenmill checkpoint directory; `out/pruned` holds the student before training)."""
    torch.manual_seed(options.seed)
    ckpt = teacher.checkpoint
    config = ckpt.config
    weights = float_weights(ckpt)
    teacher_params = parameter_count(weights, config)
    per_layer = sum(t.numel() for name, t in weights.items() if name.startswith("layers.0."))
    num_drop = layers_to_drop(teacher_params, per_layer, options.params_fraction, config.num_layers)
    calibration = [t for seq in train_ids for t in seq][: 4 * options.seq_len]
    influence = block_influence(teacher.model, teacher.score, calibration, options.seq_len)
    drop = least_influential(influence, num_drop)
    weights, student_config = drop_layers(weights, config, drop)
    result = DistillResult(teacher_params, parameter_count(weights, student_config), drop)
    student = build_model(Checkpoint(ckpt.path, "safetensors", student_config, weights, ckpt.tokenizer, 0),
                          torch.float32)
    runner = ModelRunner(student, KVCache(student_config, 1, 1, torch.float32))
    record = {"teacher": str(ckpt.path), "method": "depth-prune+kd", "dropped_layers": drop,
              "params_fraction": options.params_fraction}
    save_checkpoint(out / "pruned", student_config, checkpoint_state(student), ckpt.tokenizer, {},
                    {"distillation": record})
    result.pruned = kl_divergence(teacher.score, runner.score, eval_ids, options.seq_len, options.seq_len // 2)
    windows = [list(seq[i:i + options.seq_len]) for seq in train_ids
               for i in range(0, max(1, len(seq) - 1), options.seq_len) if len(seq[i:i + options.seq_len]) > 1]
    if not windows:
        raise ValueError("no training text: give at least 2 tokens")
    student.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=options.lr, weight_decay=0.0)
    rng = random.Random(options.seed)
    started = time.perf_counter()
    deadline = started + 60 * options.minutes
    bar = tqdm(total=round(60 * options.minutes), unit="s", desc="distilling", disable=not progress)
    while time.perf_counter() < deadline:
        ids = rng.choice(windows)
        with torch.no_grad():
            target = teacher.score(ids).float().log_softmax(-1).topk(options.top_k, dim=-1)
        logits = student(*runner.uncached_inputs(ids))
        loss = topk_kl(target.values, logits.log_softmax(-1).gather(-1, target.indices))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        result.steps += 1
        result.tokens += len(ids)
        result.losses.append(loss.item())
        bar.n = min(bar.total, round(time.perf_counter() - started))
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{result.tokens / (time.perf_counter() - started):.0f}")
    bar.close()
    result.seconds = time.perf_counter() - started
    student.requires_grad_(False)
    result.distilled = kl_divergence(teacher.score, runner.score, eval_ids, options.seq_len, options.seq_len // 2)
    record.update(minutes=options.minutes, steps=result.steps, tokens=result.tokens, lr=options.lr,
                  top_k=options.top_k)
    save_checkpoint(out, student_config, checkpoint_state(student), ckpt.tokenizer, {}, {"distillation": record})
    return result
