"""Variants are data: each model module ends with a table ``VARIANTS = {registry name: ModelVariant}``
from which the registry's rows are generated (no subclasses, no ``if name == ...`` chains)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelVariant:
    """One registry row.

    - ``options``: the model/trainer options where this row differs from the signatures' defaults
      (the signatures are the one home of every other default);
    - ``train``: the spec's training defaults of this row (epochs, batch, image size, normalize);
    - ``tiny``: a configuration small enough for the registry contract test on a 2-core CPU
      (options and training keys, e.g. random weights, 64 px, one epoch or two steps);
    - ``paper``: the paper's own schedule where it differs from ``train`` (shown by ``anomalyzoo list``);
    - ``note``: what a user must know before choosing the row (shown by ``anomalyzoo list``).
    """

    trainer: type
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    note: str = ""
