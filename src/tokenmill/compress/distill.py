"""Knowledge distillation on this machine's CPU within a time budget, into one of three students.

- depth: the teacher with its least influential layers dropped (compress/prune.py); all of it trains.
- early-exit: the teacher's first `exit_layer` layers, frozen, then one decoder layer (a copy of the teacher's
  last) and the final norm, which train to turn the teacher's hidden state at that depth into its next-token
  distribution (LayerSkip's early exit, with a trained exit instead of the raw final norm and LM head). Written
  with the frozen layers, it is a draft model that `speculative_config` method "draft_model" loads.
- qad (quantization-aware distillation): the teacher's own weights, their decoder linears seen through int4
  round-to-nearest on the grid they will be saved in (a straight-through estimator passes the gradient to the
  float weights), so training moves each weight where its rounding costs the outputs least; saved as that int4
  checkpoint.

`DIR/pruned` holds the student before training (depth: the pruned model; early-exit: the raw exit, i.e. the
truncated self-draft; qad: plain round-to-nearest), so what training adds is on record: both are scored against
the teacher on held-out text.

Both train on KL(teacher || student) over the teacher's top-k tokens plus one bucket for all other tokens (a true
divergence of the two distributions so coarsened: the student is pulled to the teacher's top-k probabilities and
to its tail mass, not just up on the top-k). The teacher is the served engine itself (packed weights, native
kernels, no gradients); what it computes for a training window (its top-k and, for an early exit, the hidden state
entering the exit) is kept, so a window drawn again costs only the student's step. The student runs the PyTorch
path in float32, its matmuls in bfloat16 where the CPU has them natively. Training text: the shipped calibration
text, user files, the teacher's samples continuing it, and the teacher's answers to the built-in prompts. The
trainer's state (the learning weights, AdamW's moments, the window order, the counters) is written to
DIR/trainer_state.pt every minute and at the end: options.resume continues an interrupted run from its last
minute, or a finished one up to a larger budget.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tokenmill.cache.kv_cache import KVCache
from tokenmill.compress.fake_quant import fake_quantized, without_fake_quantization
from tokenmill.compress.kld import KLDResult, kl_divergence
from tokenmill.compress.prune import block_influence, drop_layers, least_influential, parameter_count
from tokenmill.compress.quantize import QuantizeOptions, float_weights, model_scorer, quantize_weights
from tokenmill.config import ModelConfig
from tokenmill.hardware import has_native_bf16
from tokenmill.llm import LLM
from tokenmill.model.build import build_model, checkpoint_state
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader.checkpoint import Checkpoint
from tokenmill.model.runner import uncached_inputs
from tokenmill.quant.checkpoint import save_checkpoint
from tokenmill.sampling_params import SamplingParams
from tokenmill.texts import training_prompts

METHODS = ("depth", "early-exit", "qad")
TRAINER_STATE = "trainer_state.pt"  # in the output directory: what --resume continues from
SAVE_SECONDS = 60.0


@dataclass(frozen=True)
class DistillOptions:
    method: str = "depth"
    params_fraction: float = 0.7  # depth: the student's parameters as a fraction of the teacher's
    exit_layer: int | None = None  # early-exit: the teacher's layers the draft keeps (None: half of them)
    group_size: int = 64  # qad: int4 inputs per scale and min
    minutes: float = 10.0  # training time (pruning, sampling and evaluation come on top)
    seq_len: int = 256
    top_k: int = 64
    lr: float = 1e-4
    sample_tokens: int = 16384  # teacher samples added to the training text
    chat_answers: int = 1  # the teacher's answers per built-in prompt: greedy, then sampled at temperature 0.8
    eval_tokens: int = 2048  # of the held-out text, for the KL before and after
    seed: int = 0
    bf16: bool = field(default_factory=has_native_bf16)  # the student's matmuls in bfloat16 (autocast)
    resume: bool = False  # continue from the output directory's trainer state until `minutes` of training

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.params_fraction <= 1:
            raise ValueError(f"params_fraction must be in (0, 1], got {self.params_fraction}")
        if self.exit_layer is not None and (self.method != "early-exit" or self.exit_layer < 1):
            raise ValueError("exit_layer is for method 'early-exit' and must be >= 1")
        if self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size}")
        if self.minutes < 0 or self.seq_len < 2 or self.top_k < 1 or self.lr <= 0 or self.chat_answers < 0:
            raise ValueError("minutes >= 0, seq_len >= 2, top_k >= 1, lr > 0 and chat_answers >= 0 are required")


@dataclass
class DistillResult:
    teacher_params: int
    student_params: int
    dropped_layers: list[int]  # the teacher's layers the student does not have (early-exit: all from exit_layer)
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


def chat_answers(teacher: LLM, answers: int, seed: int, max_tokens: int = 256) -> list[list[int]]:
    """Chat-templated prompt + answer sequences: the teacher answering each built-in prompt that benchmarks do not
    hold out `answers` times, greedily first, then sampled at 0.8."""
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in training_prompts()]
    sequences = []
    for i in range(answers):
        params = SamplingParams(temperature=0.0 if i == 0 else 0.8, max_tokens=max_tokens, seed=seed + i)
        sequences += [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
                      for o in teacher.chat(conversations, params)]
    return sequences


def topk_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over k tokens and a bucket for the rest: log-probabilities
    [positions, k] of the teacher's top-k tokens under each model."""
    def with_rest(logp: torch.Tensor) -> torch.Tensor:
        rest = (1 - logp.exp().sum(-1, keepdim=True)).clamp_min(1e-12).log()
        return torch.cat((logp, rest), -1)

    teacher, student = with_rest(teacher_logp), with_rest(student_logp)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def with_exit_layer(weights: dict[str, torch.Tensor], config: ModelConfig, exit_layer: int
                    ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The teacher's first `exit_layer` layers, then a copy of its last layer as layer `exit_layer`."""
    if not 1 <= exit_layer < config.num_layers:
        raise ValueError(f"exit_layer must be in 1..{config.num_layers - 1} for a {config.num_layers}-layer "
                         f"teacher, got {exit_layer}")
    out, first = drop_layers(weights, config, range(exit_layer, config.num_layers))
    last = f"layers.{config.num_layers - 1}."
    out.update({f"layers.{exit_layer}.{name[len(last):]}": t.clone() for name, t in weights.items()
                if name.startswith(last)})
    return out, dataclasses.replace(first, num_layers=exit_layer + 1)


class TeacherTargets:
    """The teacher's top-k log-probabilities for a training window and, for an early exit, its hidden state
    entering the exit layer; computed on a window's first draw and kept."""

    def __init__(self, teacher: LLM, top_k: int, exit_layer: int | None) -> None:
        self.teacher, self.top_k = teacher, top_k
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.hidden: torch.Tensor | None = None
        self.hook = None if exit_layer is None else teacher.model.layers[exit_layer - 1].register_forward_hook(
            lambda module, args, out: setattr(self, "hidden", out))

    def __call__(self, index: int, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if index not in self.kept:
            with torch.no_grad():
                top = self.teacher.score(ids).float().log_softmax(-1).topk(self.top_k, dim=-1)
            hidden = None if self.hook is None else self.hidden.detach().float().clone()
            self.kept[index] = (top.values, top.indices, hidden)
        return self.kept[index]

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()


def student_logits(student: LlamaModel, kv: KVCache, ids: Sequence[int], hidden: torch.Tensor | None
                   ) -> torch.Tensor:
    """The student's logits for a window: the whole model, or (an early exit) its last layer reading `hidden`."""
    inputs = uncached_inputs(ids, kv)
    if hidden is None:
        return student(*inputs)
    _, positions, kv, meta = inputs
    last = student.config.num_layers - 1
    out = student.layers[last](hidden, positions, student.layer_rotary[last], kv, meta[kv.layout.group_of[last]])
    return student.logits(out)


def distill(teacher: LLM, train_ids: Sequence[Sequence[int]], eval_ids: Sequence[int], out: Path,
            options: DistillOptions = DistillOptions(), progress: bool = False) -> DistillResult:
    """Make the student of options.method from the teacher, train it for options.minutes on `train_ids`
    (sequences of token ids), and write it to `out` (a tokenmill checkpoint directory; `out/pruned` holds the
    student before training)."""
    torch.manual_seed(options.seed)
    ckpt = teacher.checkpoint
    weights = float_weights(ckpt)
    windows = [list(seq[i:i + options.seq_len]) for seq in train_ids
               for i in range(0, max(1, len(seq) - 1), options.seq_len) if len(seq[i:i + options.seq_len]) > 1]
    if not windows:
        raise ValueError("no training text: give at least 2 tokens")
    exit_layer = None
    if options.method == "depth":
        per_layer = sum(t.numel() for name, t in weights.items() if name.startswith("layers.0."))
        num_drop = layers_to_drop(parameter_count(weights, ckpt.config), per_layer, options.params_fraction,
                                  ckpt.config.num_layers)
        calibration = [t for seq in train_ids for t in seq][: 4 * options.seq_len]
        drop = least_influential(block_influence(teacher.model, teacher.score, calibration, options.seq_len),
                                 num_drop)
        untrained = start = drop_layers(weights, ckpt.config, drop)
        record = {"method": "depth-prune+kd", "dropped_layers": drop, "params_fraction": options.params_fraction}
    elif options.method == "early-exit":
        exit_layer = options.exit_layer or ckpt.config.num_layers // 2
        drop = list(range(exit_layer, ckpt.config.num_layers))
        untrained = drop_layers(weights, ckpt.config, drop)  # the raw exit: final norm and LM head at that depth
        start = with_exit_layer(weights, ckpt.config, exit_layer)
        record = {"method": "early-exit+kd", "exit_layer": exit_layer}
    else:
        quant = QuantizeOptions("int4", options.group_size)
        quant.check_model(ckpt.config)
        drop = []
        untrained = start = (weights, ckpt.config)
        record = {"method": "qad", "bits": 4, "group_size": options.group_size}
    record = {"teacher": str(ckpt.path), **record}
    result = DistillResult(parameter_count(weights, ckpt.config), parameter_count(*start), drop)

    def model(state: tuple[dict[str, torch.Tensor], ModelConfig]) -> LlamaModel:
        built = build_model(Checkpoint(ckpt.path, "safetensors", state[1], state[0], ckpt.tokenizer, 0),
                            torch.float32)
        return built if options.method != "qad" else fake_quantized(built, quant.grid)

    def save(path: Path, student: LlamaModel) -> None:
        if options.method != "qad":
            save_checkpoint(path, student.config, checkpoint_state(student), ckpt.tokenizer, {},
                            {"distillation": record})
            return
        floats = checkpoint_state(without_fake_quantization(student))
        rounded = quantize_weights(Checkpoint(ckpt.path, "safetensors", student.config, floats, ckpt.tokenizer, 0),
                                   quant)
        save_checkpoint(path, student.config, rounded, ckpt.tokenizer, quant.config_dict(), {"distillation": record})

    before = model(untrained)
    result.pruned = kl_divergence(teacher.score, model_scorer(before), eval_ids, options.seq_len, options.seq_len // 2)
    save(out / "pruned", before)
    del before
    student = model(start)
    trained = {"depth": student, "early-exit": torch.nn.ModuleList([student.layers[-1], student.norm]),
               "qad": torch.nn.ModuleList([student.layers, student.norm])}[options.method]
    targets = TeacherTargets(teacher, options.top_k, exit_layer)
    try:
        _train(student, trained, lambda i: targets(i, windows[i]), windows, options, result, out / TRAINER_STATE,
               progress)
    finally:
        targets.close()
    result.distilled = kl_divergence(teacher.score, model_scorer(student), eval_ids, options.seq_len,
                                     options.seq_len // 2)
    record.update(minutes=options.minutes, steps=result.steps, tokens=result.tokens, lr=options.lr,
                  top_k=options.top_k)
    save(out, student)
    return result


def _train(student: LlamaModel, trained: torch.nn.Module,
           targets: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
           windows: list[list[int]], options: DistillOptions, result: DistillResult, state_path: Path,
           progress: bool) -> None:
    """AdamW on `trained` (the part of `student` that learns), a random window per step, until options.minutes
    of training; the trainer's state is written to `state_path` every SAVE_SECONDS and at the end, and read back
    first with options.resume."""
    student.requires_grad_(False)
    for param in trained.parameters():
        param.data = param.data.clone()  # loaded with assign=True, it may be the teacher checkpoint's own tensor
        param.requires_grad_(True)
    kv = KVCache(student.config, 1, 1, torch.float32)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=options.lr, weight_decay=0.0)
    rng = random.Random(options.seed)
    done = 0.0
    if options.resume:
        if not state_path.exists():
            raise ValueError(f"nothing to resume: {state_path} does not exist")
        state = torch.load(state_path, weights_only=False)
        changed = sorted(k for k, v in _run_identity(options).items() if state["options"].get(k) != v)
        if changed:
            raise ValueError(f"cannot resume with other {', '.join(changed)} than the run in {state_path} had")
        trained.load_state_dict(state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        result.steps, result.tokens, result.losses = state["steps"], state["tokens"], state["losses"]
        done = state["seconds"]

    def save() -> None:
        result.seconds = time.perf_counter() - started
        torch.save({"options": _run_identity(options), "trained": trained.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": rng.getstate(), "steps": result.steps,
                    "tokens": result.tokens, "losses": result.losses, "seconds": result.seconds}, state_path)

    started = time.perf_counter() - done
    deadline = started + 60 * options.minutes
    saved = time.perf_counter()
    bar = tqdm(total=round(60 * options.minutes), initial=round(done), unit="s", desc="distilling",
               disable=not progress)
    while time.perf_counter() < deadline:
        index = rng.randrange(len(windows))
        values, indices, hidden = targets(index)
        with torch.autocast("cpu", torch.bfloat16, enabled=options.bf16):
            logits = student_logits(student, kv, windows[index], hidden)
        loss = topk_kl(values, logits.float().log_softmax(-1).gather(-1, indices))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        result.steps += 1
        result.tokens += len(windows[index])
        result.losses.append(loss.item())
        bar.n = min(bar.total, round(time.perf_counter() - started))
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{result.tokens / (time.perf_counter() - started):.0f}")
        if time.perf_counter() - saved > SAVE_SECONDS:
            save()
            saved = time.perf_counter()
    bar.close()
    save()
    student.requires_grad_(False)


def _run_identity(options: DistillOptions) -> dict:
    """The options a resumed run must share with the one it continues (all but the budget)."""
    return {k: v for k, v in dataclasses.asdict(options).items() if k not in ("minutes", "resume")}
