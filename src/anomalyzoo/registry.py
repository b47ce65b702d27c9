"""ModelRegistry: model name -> trainer class, model defaults and training defaults.

The rows are generated from each model module's ``VARIANTS`` table (variants are data); a row
stores only what differs from the trainer's and model's signatures, which are the one home of
every default: ``get_model_config`` merges the two. Only implemented models are registered;
asking for any other name is an error that lists the closest registered names.
"""

from __future__ import annotations

import copy
import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("memory", "flow", "distillation", "reconstruction", "adaptation", "foundation")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    trainer_path: str
    model_config: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    family: str = "other"
    # the paper's own schedule where it differs from the spec's defaults, with the override that
    # reproduces it (shown by `anomalyzoo list`; never applied silently)
    paper_schedule: dict[str, Any] = field(default_factory=dict)
    # options and training keys small enough for the registry contract test
    tiny_config: dict[str, Any] = field(default_factory=dict)
    # what a user must know before choosing it (shown by `anomalyzoo list`)
    note: str = ""


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class ModelRegistry:
    _entries: dict[str, ModelEntry] = {}

    @classmethod
    def register(cls, name: str, trainer_path: str, model_config: dict[str, Any], train_config: dict[str, Any],
                 family: str = "other", paper_schedule: dict[str, Any] | None = None,
                 tiny_config: dict[str, Any] | None = None, note: str = "") -> None:
        cls._entries[name] = ModelEntry(name, trainer_path, dict(model_config), dict(train_config), family,
                                        dict(paper_schedule or {}), dict(tiny_config or {}), note)

    @classmethod
    def get(cls, name: str) -> ModelEntry:
        if name not in cls._entries:
            close = difflib.get_close_matches(name, cls._entries, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownModelError(
                f"Unknown model '{name}'.{hint} Registered models: {', '.join(sorted(cls._entries))}."
            )
        return cls._entries[name]

    @classmethod
    def is_registered(cls, name: str) -> bool:
        return name in cls._entries

    @classmethod
    def list_models(cls) -> list[str]:
        return sorted(cls._entries)

    @classmethod
    def list_by_category(cls) -> dict[str, list[str]]:
        families: dict[str, list[str]] = {}
        for entry in cls._entries.values():
            families.setdefault(entry.family, []).append(entry.name)
        order = {family: i for i, family in enumerate(FAMILIES)}
        return {f: sorted(names) for f, names in sorted(families.items(), key=lambda item: order.get(item[0], 99))}

    @classmethod
    def get_train_config(cls, name: str) -> dict[str, Any]:
        return copy.deepcopy(cls.get(name).train_config)

    @classmethod
    def get_model_config(cls, name: str) -> dict[str, Any]:
        """Every option of the model and its trainer: the signatures' defaults with this row's values."""
        defaults = cls.get_trainer_class(name).option_defaults()
        return copy.deepcopy({**defaults, **cls.get(name).model_config})

    @classmethod
    def get_tiny_config(cls, name: str) -> dict[str, Any]:
        """The row's tiny configuration (options and training keys) for quick tests."""
        return copy.deepcopy(cls.get(name).tiny_config)

    @classmethod
    def get_trainer_class(cls, name: str) -> type:
        module_path, _, class_name = cls.get(name).trainer_path.rpartition(".")
        return getattr(importlib.import_module(module_path), class_name)

    @classmethod
    def get_trainer(cls, name: str, model_config: dict[str, Any] | None = None, train_config: Any = None, device: Any = None):
        """Build the trainer of ``name``; ``model_config`` entries override the row's. Option names
        are checked against the signatures first, so a typo lists the valid options and an error
        raised inside a constructor is never disguised as one."""
        trainer_class = cls.get_trainer_class(name)
        config = {**cls.get(name).model_config, **(model_config or {})}
        try:
            trainer_class.check_options(config)
        except TypeError as error:
            raise TypeError(f"Model '{name}' does not accept these options: {error}") from None
        if train_config is None or isinstance(train_config, dict):
            train_config = {**cls.get_train_config(name), **(train_config or {})}
        trainer = trainer_class(train_config=train_config, device=device, **config)
        trainer.model_type = name
        return trainer

    @classmethod
    def register_all_models(cls) -> None:
        """One row per entry of every model module's ``VARIANTS`` table."""
        for module_name in MODEL_MODULES:
            module = importlib.import_module(module_name)
            for name, variant in module.VARIANTS.items():
                trainer_path = f"{module_name}.{variant.trainer.__name__}"
                cls.register(name, trainer_path, variant.options, variant.train, variant.family, variant.paper, variant.tiny,
                             variant.note)


# The model families, in the order `anomalyzoo list` shows them within a family.
MODEL_MODULES = (
    "anomalyzoo.models.padim",
    "anomalyzoo.models.patchcore",
    "anomalyzoo.models.dfkde",
    "anomalyzoo.models.cflow",
    "anomalyzoo.models.fastflow",
    "anomalyzoo.models.csflow",
    "anomalyzoo.models.uflow",
    "anomalyzoo.models.stfpm",
    "anomalyzoo.models.fre",
    "anomalyzoo.models.reverse_distillation",
    "anomalyzoo.models.efficientad",
    "anomalyzoo.models.autoencoder",
    "anomalyzoo.models.ganomaly",
    "anomalyzoo.models.draem",
    "anomalyzoo.models.dsr",
    "anomalyzoo.models.dfm",
    "anomalyzoo.models.uninet",
    "anomalyzoo.models.dinomaly",
    "anomalyzoo.models.cfa",
    "anomalyzoo.models.supersimplenet",
)

ModelRegistry.register_all_models()
