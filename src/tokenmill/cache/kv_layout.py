"""KV groups: which layers share a block table, and where each layer's K/V live in the block memory.

Layers with different attention spans need different block tables: a full-attention layer keeps every
block of a sequence, a sliding-window layer only the blocks its window still reaches. As in vLLM's hybrid
allocator, layers are cut into groups of equal size `slots`, each group of one window, and all groups draw
from one block pool: a block id is `slots` layers' worth of K/V, used by whichever group allocated it. Layer
`l` reads slot `slot_of[l]` of the blocks in its group's table.

Llama-style models (one kind of layer) get one group of all layers, i.e. one table per request, as before.
Gemma 3 270M (15 sliding, 3 full layers) gets 6 groups of 3: one full, five sliding. When the sliding
layers are not a multiple of the full ones, the last sliding group has unused slots (a little memory waste).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import ModelConfig


@dataclass(frozen=True)
class KVGroup:
    layers: tuple[int, ...]  # model layers, in slot order
    window: int | None  # their sliding window; None: full attention


@dataclass(frozen=True)
class KVLayout:
    groups: tuple[KVGroup, ...]
    slots: int  # layers per block
    group_of: tuple[int, ...]  # per model layer
    slot_of: tuple[int, ...]  # per model layer

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(g.window for g in self.groups)

    @classmethod
    def from_config(cls, config: ModelConfig) -> KVLayout:
        by_window: dict[int | None, list[int]] = {}
        for layer in range(config.num_layers):
            by_window.setdefault(config.layer_window(layer), []).append(layer)
        slots = min(len(layers) for layers in by_window.values())
        groups = tuple(KVGroup(tuple(layers[i:i + slots]), window)
                       for window, layers in by_window.items() for i in range(0, len(layers), slots))
        group_of, slot_of = [0] * config.num_layers, [0] * config.num_layers
        for g, group in enumerate(groups):
            for s, layer in enumerate(group.layers):
                group_of[layer], slot_of[layer] = g, s
        return cls(groups, slots, tuple(group_of), tuple(slot_of))
