"""AWQ (activation-aware weight quantization, Lin et al. 2023) on a Llama checkpoint's float weights.

Input channels that carry large activations matter most, so before rounding, each such column of a linear
weight is multiplied by s > 1 (rounding it more finely relative to its size) and the layer's input is divided
by s, which is folded exactly into whatever produces that input: the RMSNorm weight before q/k/v and gate/up,
v_proj's rows before o_proj, up_proj's rows before down_proj. Per group of linears sharing an input,
s = mean|x|^alpha with alpha searched on a grid to minimize the output error on calibration activations
(alpha = 0 is plain round-to-nearest, so the search never does worse on that data). Then each weight's
per-group clipping range is searched the same way. The result is still a float checkpoint plus clip ratios;
round-to-nearest with those ratios gives the quantized weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from tokenmill.compress.calibration import LinearInputs
from tokenmill.config import ModelConfig
from tokenmill.quant.grid import Grid

ALPHA_GRID = 20  # alphas 0, 0.05, ..., 0.95
CLIP_GRID = 20  # clip ratios 1.0, 0.975, ..., 0.525
MAX_SHRINK = 0.5
NO_CLIP = ("q_proj", "k_proj")  # as in AWQ: their error passes through softmax, the output MSE does not judge it


@dataclass(frozen=True)
class ScaleGroup:
    inputs: str  # the model module whose recorded input the scale divides (fused names: qkv_proj, gate_up_proj)
    linears: tuple[str, ...]  # checkpoint matrices whose input columns are multiplied by s
    fold: str  # checkpoint tensor that absorbs 1/s: a norm weight (1-D) or a linear whose output rows feed it
    repeat: int = 1  # input channels per folded row (GQA: query heads per KV head, o_proj reads each v row)


@dataclass
class AwqResult:
    weights: dict[str, torch.Tensor]  # scaled float weights: the same function as the input checkpoint
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # matrix name -> [out, groups] clip ratio
    alphas: dict[str, float] = field(default_factory=dict)  # scale group input -> chosen alpha


def scale_groups(config: ModelConfig) -> list[ScaleGroup]:
    groups = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        groups += [
            ScaleGroup(attn + "qkv_proj", tuple(f"{attn}{n}_proj.weight" for n in "qkv"), p + "input_layernorm.weight"),
            ScaleGroup(attn + "o_proj", (attn + "o_proj.weight",), attn + "v_proj.weight",
                       config.num_heads // config.num_kv_heads),
            ScaleGroup(mlp + "gate_up_proj", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                       p + "post_attention_layernorm.weight"),
            ScaleGroup(mlp + "down_proj", (mlp + "down_proj.weight",), mlp + "up_proj.weight"),
        ]
    return groups


def awq(weights: dict[str, torch.Tensor], config: ModelConfig, inputs: dict[str, LinearInputs], grid: Grid,
        clip: bool = True, progress: bool = False) -> AwqResult:
    """Scale and clip every decoder linear; `weights` (float, checkpoint names) is not modified."""
    result = AwqResult(dict(weights))
    w = result.weights
    for group in tqdm(scale_groups(config), desc="awq", unit="group", disable=not progress):
        stats = inputs[group.inputs]
        head_dim = config.head_dim if group.repeat > 1 else 0
        alpha, s = _search_scale([w[n] for n in group.linears], stats, grid, group.repeat, head_dim)
        result.alphas[group.inputs] = alpha
        for name in group.linears:
            w[name] = w[name] * s
        _fold(w, group.fold, s, group.repeat, head_dim)
        if clip:
            scaled = _scaled_inputs(stats, s)
            for name in group.linears:
                if not name.endswith(tuple(f"{n}.weight" for n in NO_CLIP)):
                    result.clips[name] = _search_clip(w[name], scaled, grid)
    return result


def _tied(values: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """Average over the query heads that share a KV head, so one scale per v_proj row folds exactly."""
    if repeat == 1:
        return values
    heads = values.view(-1, repeat, head_dim)
    return heads.mean(1, keepdim=True).expand_as(heads).reshape(-1)


def _search_scale(mats: list[torch.Tensor], stats: LinearInputs, grid: Grid, repeat: int,
                  head_dim: int) -> tuple[float, torch.Tensor]:
    w = torch.cat(mats)
    x_mean = _tied(stats.abs_mean, repeat, head_dim).clamp(min=1e-4)
    alphas = torch.arange(ALPHA_GRID, dtype=torch.float32) / ALPHA_GRID
    scales = x_mean[None].pow(alphas[:, None])
    scales = scales / (scales.amax(1, keepdim=True) * scales.amin(1, keepdim=True)).sqrt()
    losses = []
    for batch in scales.split(_batch(w)):
        scaled = w[None] * batch[:, None]  # [candidates, out, in]
        losses.append(_errors(w, grid.fake(scaled.flatten(0, 1)).view_as(scaled) / batch[:, None], stats.gram))
    best = int(torch.cat(losses).argmin())
    return best / ALPHA_GRID, scales[best]


def _batch(w: torch.Tensor) -> int:
    """Candidates evaluated at once: about 32M floats of weight copies."""
    return max(1, 2**25 // w.numel())


def _errors(w: torch.Tensor, candidates: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Output error over the calibration tokens of each candidate [n, out, in] replacing w."""
    delta = w - candidates
    return ((delta @ gram) * delta).sum((1, 2))


def _fold(w: dict[str, torch.Tensor], name: str, s: torch.Tensor, repeat: int, head_dim: int) -> None:
    if w[name].dim() == 1:  # an RMSNorm weight: y = x / rms(x) * weight
        w[name] = w[name] / s
        return
    rows = s.view(-1, repeat, head_dim)[:, 0].reshape(-1) if repeat > 1 else s
    w[name] = w[name] / rows[:, None]
    bias = name.removesuffix(".weight") + ".bias"
    if bias in w:
        w[bias] = w[bias] / rows


def _scaled_inputs(stats: LinearInputs, s: torch.Tensor) -> LinearInputs:
    """The statistics of x / s: what the scaled linears see."""
    inv = 1 / s
    return LinearInputs(stats.abs_mean * inv, stats.gram * inv[:, None] * inv[None, :], stats.num_tokens)


def _search_clip(w: torch.Tensor, stats: LinearInputs, grid: Grid) -> torch.Tensor:
    """Per (output row, group) clip ratio minimizing that group's contribution to the output error."""
    out, inp = w.shape
    group = grid.group(inp)
    groups = inp // group
    blocks = stats.gram.view(groups, group, groups, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [g, k, k]
    ratios = 1 - MAX_SHRINK * torch.arange(CLIP_GRID, dtype=torch.float32) / CLIP_GRID
    errors = []
    for r in ratios.split(_batch(w)):
        clip = r.repeat_interleave(out)[:, None]  # one ratio per candidate copy of w
        delta = (w.repeat(len(r), 1) - grid.fake(w.repeat(len(r), 1), clip=clip)).view(-1, groups, group)
        delta = delta.transpose(0, 1)  # [groups, candidates * out, k]
        errors.append((torch.bmm(delta, blocks) * delta).sum(-1).T.reshape(len(r), out, groups))
    return ratios[torch.cat(errors).argmin(0)]
