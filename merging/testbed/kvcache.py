"""A key/value cache for greedy decoding that appends in place instead of concatenating.

transformers' `DynamicLayer` grows its keys and values with `torch.cat` at every step, copying the
whole cache each time: for a batch of 512 tiny-model rows that copy was 40 % of decoding time.
`ReservedLayer` keeps them in storage with room to spare (doubled when full, so each value is
copied O(1) times on average) and hands attention views of the filled part. Values and the
attention computed from them are the same as with `DynamicLayer`. Rows that finish decoding can be
dropped from the batch (`batch_select_indices`, as transformers' layers do).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """One attention layer's cache, written into reserved storage (see module docstring)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            self._reserve(key_states, value_states, max(end, 2 * self.length, self.capacity))
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, room: int) -> None:
        keys = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
        if self._keys is not None:
            keys[..., : self.length, :] = self._keys[..., : self.length, :]
            values[..., : self.length, :] = self._values[..., : self.length, :]
        self._keys, self._values = keys, values
        self.device, self.is_initialized = key_states.device, True

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (finished rows leave a decoding batch)."""
        if self._keys is None:
            return
        self._keys, self._values = self._keys[indices], self._values[indices]
        self.keys, self.values = self._keys[..., : self.length, :], self._values[..., : self.length, :]

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = 0
        super().reset()


def reserved_cache(model: Any, capacity: int) -> Cache | None:
    """A cache of `ReservedLayer`s for a model whose layers all use full attention, else None
    (the model then builds its own cache: sliding-window layers need theirs)."""
    config = model.config.get_text_config(decoder=True)
    layers = getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None) or ["full_attention"] * (layers or 0)
    if not layers or any(kind != "full_attention" for kind in types):
        return None
    return Cache(layers=[ReservedLayer(capacity) for _ in range(layers)])
