"""anomalyzoo: unsupervised visual anomaly detection, ~20 published methods behind one API."""

__version__ = "0.1.0"

from anomalyzoo.data import get_dataloaders
from anomalyzoo.deploy import export
from anomalyzoo.registry import ModelRegistry
from anomalyzoo.settings import get_globals, print_globals, set_globals
from anomalyzoo.train import (
    clear_dataloader,
    clear_memory,
    count_parameters,
    print_memory,
    set_seed,
    train,
    train_models,
)

__all__ = [
    "ModelRegistry",
    "clear_dataloader",
    "clear_memory",
    "count_parameters",
    "export",
    "get_dataloaders",
    "get_globals",
    "print_globals",
    "print_memory",
    "set_globals",
    "set_seed",
    "train",
    "train_models",
]
