"""Buffers whose size is only known after fitting (memory banks, Gaussian statistics).

``load_state_dict`` refuses tensors whose shape differs from the registered buffer; memory-bank
models register empty buffers at construction, so before loading we resize every buffer to the
shape stored in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


def resize_buffers_to_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    for name, buffer in list(module.named_buffers()):
        if name not in state_dict or buffer is None:
            continue
        stored = state_dict[name]
        if stored.shape != buffer.shape:
            owner_name, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner.register_buffer(attribute, torch.empty_like(stored, device=buffer.device))
