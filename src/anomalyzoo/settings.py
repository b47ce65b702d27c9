"""One settings object behind ``set_globals`` / ``get_globals`` / ``print_globals``.

Defaults come from the environment (``ANOMALYZOO_DATASET_DIR``, ``ANOMALYZOO_BACKBONE_DIR``,
``ANOMALYZOO_OUTPUT_DIR``) and fall back to folders under the current directory, matching the
workspace layout of the original framework (``datasets/``, ``backbones/``, ``outputs/``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name, default)).expanduser()


@dataclass
class Settings:
    dataset_dir: Path = field(default_factory=lambda: _env_path("ANOMALYZOO_DATASET_DIR", "datasets"))
    backbone_dir: Path = field(default_factory=lambda: _env_path("ANOMALYZOO_BACKBONE_DIR", "backbones"))
    output_dir: Path = field(default_factory=lambda: _env_path("ANOMALYZOO_OUTPUT_DIR", "outputs"))
    seed: int = 42
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_SETTINGS = Settings()
_PATH_FIELDS = {"dataset_dir", "backbone_dir", "output_dir"}


def get_settings() -> Settings:
    """The live settings object (mutated by :func:`set_globals`)."""
    return _SETTINGS


def set_globals(**values: Any) -> Settings:
    """Set any of dataset_dir, backbone_dir, output_dir, seed, num_workers, pin_memory,
    persistent_workers. Unknown names are an error (a typo must not be silently ignored)."""
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"set_globals() got unknown setting(s) {unknown}; known: {sorted(known)}")
    for name, value in values.items():
        if value is None:
            continue
        if name in _PATH_FIELDS:
            value = Path(value).expanduser()
        setattr(_SETTINGS, name, value)
    return _SETTINGS


def get_globals() -> dict[str, Any]:
    """A copy of the current settings as a plain dict (upper-case keys as in the original API
    are also accepted by readers: DATASET_DIR etc.)."""
    values = _SETTINGS.as_dict()
    return {**values, **{k.upper(): v for k, v in values.items()}}


def print_globals() -> None:
    for name, value in _SETTINGS.as_dict().items():
        print(f"{name.upper():<20} {value}")


def reset_globals() -> Settings:
    """Restore the defaults (environment variables re-read). Used by tests."""
    fresh = Settings()
    for f in dataclasses.fields(Settings):
        setattr(_SETTINGS, f.name, getattr(fresh, f.name))
    return _SETTINGS
