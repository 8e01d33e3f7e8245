"""KV groups: layers with the same window share block tables, in groups of equal size."""
from __future__ import annotations

import pytest

from tokenmill.cache.kv_layout import KVLayout
from tokenmill.config import ModelConfig


def _config(layer_types: tuple[str, ...] | None, num_layers: int) -> ModelConfig:
    return ModelConfig(architecture="gemma3", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=num_layers,
                       num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=64, tie_word_embeddings=True, layer_types=layer_types,
                       sliding_window=512 if layer_types else None)


def _gemma_pattern(num_layers: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers))


def test_one_group_without_sliding_layers():
    layout = KVLayout.from_config(_config(None, 30))
    assert layout.slots == 30 and layout.windows == (None,)
    assert layout.group_of == (0,) * 30 and layout.slot_of == tuple(range(30))


def test_gemma3_270m_layout():
    """18 layers, every 6th global: 3 full layers -> groups of 3, five sliding groups and one full."""
    layout = KVLayout.from_config(_config(_gemma_pattern(18), 18))
    assert layout.slots == 3
    assert layout.windows == (512,) * 5 + (None,)
    assert layout.groups[-1].layers == (5, 11, 17)
    assert sorted(layer for g in layout.groups for layer in g.layers) == list(range(18))
    for layer in range(18):  # each layer has exactly one (group, slot) home
        assert layout.groups[layout.group_of[layer]].layers[layout.slot_of[layer]] == layer


def test_uneven_group_leaves_slots_unused():
    """13 layers: 2 full, 11 sliding -> groups of 2, the last sliding group holds one layer."""
    layout = KVLayout.from_config(_config(_gemma_pattern(13), 13))
    assert layout.slots == 2 and [len(g.layers) for g in layout.groups] == [2, 2, 2, 2, 2, 1, 2]
    assert len({(layout.group_of[i], layout.slot_of[i]) for i in range(13)}) == 13


def test_sliding_layers_need_a_window():
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(architecture="gemma3", vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=64, tie_word_embeddings=True,
                    layer_types=("sliding_attention", "full_attention"))
    with pytest.raises(ValueError, match="layer_types"):
        _config(("full_attention",), 2)
