"""BaseTrainer and EarlyStopper: the one training loop every model shares.

A model file subclasses :class:`BaseTrainer` and overrides ``train_step`` (one optimisation
step, or one batch of feature collection for memory-bank models) and, where its scoring is not
just ``model(images)``, ``validation_step``. Everything else -- epochs, progress bars,
validation, early stopping, checkpoints, resuming, results and figures -- lives here.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import inspect
import math
import os
import platform
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torchvision
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalyzoo.metrics.normalization import NormalStatistics, normal_statistics
from anomalyzoo.metrics.predictions import Predictions
from anomalyzoo.models.components.dynamic_buffer import resize_buffers_to_state_dict
from anomalyzoo.models.components.tiler import Tiler, tiled_scores
from anomalyzoo.report.run import save_run_histogram, save_run_maps, write_run_results

CHECKPOINT_FORMAT = "anomalyzoo-checkpoint-v1"


@dataclass
class TrainConfig:
    """Training keys of the registry (epochs, batch, image size, normalisation) and the loop's
    own options. Every field can be overridden per run through ``train(...)``."""

    num_epochs: int = 1
    # when set, training runs exactly this many optimisation steps (as many epochs as that takes,
    # the last one cut short) and step-based schedules use it; papers that train by steps
    # (EfficientAD: 70,000) list it in `anomalyzoo list`
    num_steps: int | None = None
    batch_size: int = 8
    img_size: int = 256
    # < 1: images (and masks) are resized to img_size / crop_pct and centre-cropped to img_size
    # (timm's crop_pct; Dinomaly's R448-C392 is img_size 392, crop_pct 0.875); 1.0: resized only
    crop_pct: float = 1.0
    normalize: bool = True
    seed: int = 42
    # seeded share of the normal *training* images held out for validation, early stopping,
    # the label-free threshold and score normalisation; the test split is never seen before
    # the final evaluation
    val_fraction: float = 0.1
    validate_every: int = 0  # epochs between validations; 0: once, after the last epoch
    early_stopping_monitor: str | None = None  # "val_loss" or "val_score" (see VALIDATION_METRICS)
    early_stopping_patience: int = 5
    gradient_clip_norm: float | None = None  # clip the global gradient norm before each step
    threshold_percentile: float = 99.0  # the label-free threshold: this percentile of held-out normal scores
    # [tile_size, stride]: train and score on overlapping tiles of the img_size image, maps stitched
    # back (components.tiler); for the models whose trainer sets supports_tiling
    tiling: list[int] | None = None
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"Unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))

# What validation on held-out *normal* images can measure (no labels, so no AUROC):
# ``val_loss`` is the training objective on them (models with a loss), ``val_score`` their mean
# anomaly score (any model; lower is better, as the STFPM authors' validation does).
VALIDATION_METRICS = ("val_loss", "val_score")


class EarlyStopper:
    """Stops when ``monitor`` has not improved by ``min_delta`` for ``patience`` checks."""

    def __init__(self, monitor: str = "image_auroc", patience: int = 5, mode: str | None = None, min_delta: float = 0.0) -> None:
        self.monitor = monitor
        self.patience = patience
        self.mode = mode or ("min" if monitor in VALIDATION_METRICS or "loss" in monitor else "max")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_checks = 0

    def is_improvement(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value``; return True when training should stop."""
        if self.is_improvement(value):
            self.best, self.best_epoch, self.bad_checks = value, epoch, 0
        else:
            self.bad_checks += 1
        return self.bad_checks >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_checks = state["best"], state["best_epoch"], state["bad_checks"]


def library_versions() -> dict[str, str]:
    return {
        "anomalyzoo": package_version("anomalyzoo"),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def capture_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Model constructor arguments that come from the training configuration, never from the user:
# the trainer fills them in (how the loader normalises images, the image size, the seed).
RUNTIME_ARGUMENTS = ("input_normalized", "input_size", "seed")
_NOT_OPTIONS = frozenset({"self", "train_config", "device", "model_options"})


def signature_defaults(function: Any, skip: frozenset[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments of ``function`` and their defaults (``inspect.Parameter.empty`` where
    there is none), in signature order, without ``*args``/``**kwargs`` and ``skip``."""
    parameters = inspect.signature(function).parameters.values()
    # sequences are written as tuples in signatures (immutable defaults) and used as lists
    return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default for p in parameters
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in _NOT_OPTIONS and p.name not in skip}


class BaseTrainer:
    """Owns a model, its optimiser and the loop. Subclasses set ``model_class`` and override
    ``training_loss`` (or ``train_step``).

    One home for defaults: the model's options and their defaults are the signature of
    ``model_class.__init__``; a trainer's own options (a learning rate, a data folder) are the
    keyword arguments of its ``__init__``. Every other keyword argument is passed to the model.
    ``model_config`` records the whole resolved configuration, so a checkpoint rebuilds exactly
    this trainer whatever built it (registry or direct call).
    """

    model_class: type[nn.Module]
    # training defaults the method itself requires (EfficientAD: one image per step), applied
    # under whatever a direct caller gives; the registry's rows hold the spec's other defaults
    train_defaults: dict[str, Any] = {}
    scheduler_interval = "epoch"  # when scheduler.step() runs: after each "epoch" or each "step"
    # whether the model can train and score on tiles (TrainConfig.tiling): models whose features are
    # local (a tile is an image like any other); anomalib tiles PaDiM, PatchCore, STFPM and RD
    supports_tiling = False

    def __init__(
        self,
        train_config: TrainConfig | dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        **model_options: Any,
    ) -> None:
        if not isinstance(train_config, TrainConfig):
            train_config = TrainConfig.from_dict({**self.train_defaults, **(train_config or {})})
        self.train_config = train_config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tiler = self.make_tiler(train_config)
        self.check_options(model_options)
        model_defaults = self.model_option_defaults()
        resolved = {name: model_options.get(name, default) for name, default in model_defaults.items()}
        missing = [name for name, value in resolved.items() if value is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{type(self).__name__} needs the model option(s) {missing}")
        self.model = self.build_model(**resolved).to(self.device)
        self.model_type: str = type(self).__name__.removesuffix("Trainer").lower()
        self.model_options: dict[str, Any] = copy.deepcopy(resolved)
        self.optimizer: torch.optim.Optimizer | None = None  # built when fitting starts
        self.scheduler: Any = None
        self.total_steps = 0  # optimisation steps the current fit plans (step-based schedules use it)
        self.train_loader: DataLoader | None = None
        self.valid_loader: DataLoader | None = None
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimisation steps (batches) completed
        self.dataset_dir: Path | None = None  # the run's DATASET_DIR: auxiliary data (imagenette2/, dtd/) lives there
        self.history: list[dict[str, Any]] = []
        # the decision threshold predict() applies by default, and where it came from: the
        # label-free normal threshold of :meth:`calibrate` when there is a validation split
        self.threshold: float | None = None
        self.threshold_source: str | None = None
        self.thresholds: dict[str, float] = {}  # every stored candidate, e.g. normal_val_p99, f1_optimal
        self.normal_statistics: NormalStatistics | None = None
        self.map_range: tuple[float, float] | None = None  # for comparable heat maps
        self.early_stopper: EarlyStopper | None = None
        if self.train_config.early_stopping_monitor:
            self.early_stopper = EarlyStopper(self.train_config.early_stopping_monitor, self.train_config.early_stopping_patience)

    # ----------------------------------------------------------------- options
    @property
    def model_config(self) -> dict[str, Any]:
        """Everything this trainer was built with: the model's options and the trainer's own
        (read from the attributes of the same names), as a checkpoint stores them."""
        own = {name: getattr(self, name, default) for name, default in self.trainer_option_defaults().items()}
        return {**copy.deepcopy(self.model_options), **own}

    @classmethod
    def model_option_defaults(cls) -> dict[str, Any]:
        """The model's options: ``model_class.__init__``'s keyword arguments and defaults."""
        return signature_defaults(cls.model_class.__init__, skip=RUNTIME_ARGUMENTS)

    @classmethod
    def trainer_option_defaults(cls) -> dict[str, Any]:
        """The trainer's own options: its ``__init__``'s keyword arguments and defaults."""
        return signature_defaults(cls.__init__)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every option of this trainer and its model, with its default: the single home of
        defaults that the registry, ``anomalyzoo list`` and the contract test read."""
        return {**cls.model_option_defaults(), **cls.trainer_option_defaults()}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Unknown option names are an error that lists the valid ones (before anything is built)."""
        valid = cls.option_defaults()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"{cls.__name__} does not accept the option(s) {unknown}; valid options: {sorted(valid)}")

    @classmethod
    def make_tiler(cls, train_config: TrainConfig) -> Tiler | None:
        if train_config.tiling is None:
            return None
        if not cls.supports_tiling:
            raise ValueError(f"{cls.__name__} does not support tiling (models that do: padim, patchcore, stfpm, "
                             f"reverse-distillation); leave tiling unset")
        tiler = Tiler.from_option(train_config.tiling)
        tiler.starts(train_config.img_size)  # a tile larger than the image is an error now, not at the first batch
        return tiler

    def runtime_arguments(self) -> dict[str, Any]:
        """Values of the model's :data:`RUNTIME_ARGUMENTS` that its signature asks for."""
        model_size = self.tiler.tile_size if self.tiler is not None else self.train_config.img_size
        values = {"input_normalized": self.train_config.normalize,
                  "input_size": (model_size, model_size),
                  "seed": self.train_config.seed}
        wanted = inspect.signature(self.model_class.__init__).parameters
        return {name: value for name, value in values.items() if name in wanted}

    def build_model(self, **model_options: Any) -> nn.Module:
        return self.model_class(**model_options, **self.runtime_arguments())

    # ----------------------------------------------------------------- to override
    def configure_optimizers(self) -> tuple[torch.optim.Optimizer | None, Any]:
        """(optimizer, scheduler); memory-bank models have neither. Called when fitting starts
        (``self.total_steps`` is known then, for step-based schedules)."""
        return None, None

    @property
    def uses_optimizer(self) -> bool:
        """Whether the model is trained by gradient steps (and so writes per-epoch checkpoints)."""
        return type(self).configure_optimizers is not BaseTrainer.configure_optimizers

    def setup_optimization(self) -> None:
        """Build the optimiser and scheduler once (at the first fit, or to load a checkpoint's state)."""
        if self.optimizer is None and self.uses_optimizer:
            self.optimizer, self.scheduler = self.configure_optimizers()

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The model's objective on a batch: ``{"loss": total, <term>: value, ...}``. Models with
        a loss define it; the default ``train_step`` minimises it and validation reports it on
        the held-out normal images as ``val_loss``."""
        raise NotImplementedError(f"{type(self).__name__} has no training loss")

    @property
    def has_training_loss(self) -> bool:
        return type(self).training_loss is not BaseTrainer.training_loss

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimisation step on :meth:`training_loss` (override for anything else)."""
        if not self.has_training_loss:
            raise NotImplementedError(f"{type(self).__name__} must implement train_step or training_loss")
        losses = self.training_loss(batch)
        self.optimize(losses["loss"])
        return {key: float(value.detach()) for key, value in losses.items()}

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"pred_score": (B,), "anomaly_map": (B, H, W) or absent}`` for a test batch (tile by
        tile, maps stitched, when the run uses tiling)."""
        if self.tiler is not None:
            return tiled_scores(self.model, self.tiler, batch["image"])
        return self.model(batch["image"])

    def training_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch a training step sees: its images cut into tiles when the run uses tiling."""
        if self.tiler is None:
            return batch
        images = batch["image"]
        count = self.tiler.num_tiles(*images.shape[-2:])
        return {"image": self.tiler.tile(images), "path": [path for path in batch["path"] for _ in range(count)]}

    def model_test_results(self, test_loader: DataLoader) -> dict[str, Any]:
        """Results of the model's own (label-free) decision rule on the labelled test set, beside
        the library's thresholds (U-Flow's a contrario NFA threshold and its confusion counts);
        written to the results file and metrics.json. None by default."""
        return {}

    def run_notes(self) -> dict[str, str]:
        """Facts about this run a reader of the results must know (e.g. an optional data source
        that was missing); written to the results file and metrics.json."""
        return {}

    def planned_epochs(self, loader: DataLoader, num_epochs: int | None = None) -> int:
        """Epochs of this fit: ``num_epochs``, or enough for ``train_config.num_steps`` when set."""
        num_steps = self.train_config.num_steps
        if num_steps is not None:
            if num_steps < 1:
                raise ValueError(f"num_steps must be positive, got {num_steps}")
            return math.ceil(num_steps / max(len(loader), 1))
        return num_epochs or self.train_config.num_epochs

    def planned_steps(self, loader: DataLoader, num_epochs: int | None = None) -> int:
        """Optimisation steps of this fit (what step-based schedules are defined on)."""
        if self.train_config.num_steps is not None:
            return self.train_config.num_steps
        return self.planned_epochs(loader, num_epochs) * len(loader)

    def extra_state(self) -> dict[str, Any]:
        """Anything beyond the module's state dict that a checkpoint must carry."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ----------------------------------------------------------------- hooks
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...

    # ----------------------------------------------------------------- helpers
    def optimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """zero_grad, backward, clip (``gradient_clip_norm``), step: the body of a gradient train_step."""
        self.setup_optimization()
        optimizer = optimizer or self.optimizer
        if optimizer is None:
            raise RuntimeError(f"{type(self).__name__} has no optimizer: define configure_optimizers()")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.train_config.gradient_clip_norm is not None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, self.train_config.gradient_clip_norm)
        optimizer.step()

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ----------------------------------------------------------------- loop
    def fit(
        self,
        train_loader: DataLoader,
        valid_loader: DataLoader | None = None,
        num_epochs: int | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> list[dict[str, Any]]:
        """Train from ``self.epoch`` (0, or where a resumed checkpoint stopped) to ``num_epochs``.

        With ``checkpoint_dir`` the last state is written after every epoch (``last.pth``) and the
        best by the early-stopping monitor to ``best.pth``.
        """
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.total_steps = self.planned_steps(train_loader, num_epochs)
        num_epochs = self.planned_epochs(train_loader, num_epochs)
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.check_validation_options(valid_loader)
        self.setup_optimization()
        self.on_fit_start()
        for epoch in range(self.epoch, num_epochs):
            self.on_epoch_start(epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(train_loader, epoch, num_epochs)}
            validate_every = self.train_config.validate_every or (1 if self.early_stopper is not None else 0)
            is_last = epoch + 1 == num_epochs
            should_stop = False
            if valid_loader is not None and validate_every and ((epoch + 1) % validate_every == 0 or is_last):
                record.update(self.validate(valid_loader))
            self.epoch = epoch + 1
            self.history.append(record)
            if self.early_stopper is not None and self.early_stopper.monitor in record:
                should_stop = self.early_stopper.step(float(record[self.early_stopper.monitor]), self.epoch)
                if checkpoint_dir is not None and self.early_stopper.best_epoch == self.epoch:
                    self.save_model(checkpoint_dir / "best.pth")
            self.on_epoch_end(epoch, record)
            if checkpoint_dir is not None:
                self.save_model(checkpoint_dir / "last.pth")
            if should_stop:
                tqdm.write(f"Early stopping after epoch {self.epoch}: {self.early_stopper.monitor} has not improved "
                           f"for {self.early_stopper.patience} checks (best {self.early_stopper.best:.4f} at epoch {self.early_stopper.best_epoch})")
                break
        self.on_fit_end()
        return self.history

    def train_epoch(self, loader: DataLoader, epoch: int = 0, num_epochs: int = 1) -> dict[str, float]:
        self.model.train()
        if isinstance(getattr(loader, "generator", None), torch.Generator):
            # the shuffle order of epoch e depends only on (seed, e): a resumed run sees the same batches
            loader.generator.manual_seed(self.train_config.seed * 1000 + epoch)
        self.on_train_start()
        totals: dict[str, float] = defaultdict(float)
        steps = 0
        bar = tqdm(loader, desc=f"{self.model_type} epoch {epoch + 1}/{num_epochs}", leave=False,
                   disable=not self.train_config.progress, dynamic_ncols=True)
        for batch in bar:
            if self.train_config.num_steps is not None and self.global_step >= self.train_config.num_steps:
                break
            logs = self.train_step(self.training_batch(self.to_device(batch))) or {}
            steps += 1
            self.global_step += 1
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            for key, value in logs.items():
                totals[key] += float(value)
            if logs:
                bar.set_postfix({k: f"{v / steps:.4g}" for k, v in totals.items()})
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        self.on_train_end()
        return {key: value / max(steps, 1) for key, value in totals.items()}

    def check_validation_options(self, valid_loader: DataLoader | None) -> None:
        """Fail before training when early stopping asks for something validation cannot give."""
        if self.early_stopper is None:
            return
        monitor = self.early_stopper.monitor
        if monitor not in VALIDATION_METRICS:
            raise ValueError(
                f"early_stopping_monitor={monitor!r}: validation runs on held-out normal training images "
                f"(no test labels), so it can only monitor {list(VALIDATION_METRICS)}")
        if valid_loader is None:
            raise ValueError("early stopping needs a validation split: set val_fraction > 0 (e.g. 0.1)")
        if monitor == "val_loss" and not self.has_training_loss:
            raise ValueError(f"{self.model_type} has no training loss to validate; monitor 'val_score' instead")

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """``val_loss`` (the training objective, eval mode) and ``val_score`` (mean anomaly
        score) on held-out normal images: lower is better for both."""
        record: dict[str, float] = {}
        if self.has_training_loss:
            self.model.eval()
            total, count = 0.0, 0
            for batch in loader:
                batch = self.training_batch(self.to_device(batch))
                total += float(self.training_loss(batch)["loss"]) * len(batch["path"])
                count += len(batch["path"])
            record["val_loss"] = total / max(count, 1)
        predictions = self.validation_epoch(loader)
        record["val_score"] = float(predictions.scores.mean())
        return record

    def calibrate(self, loader: DataLoader) -> NormalStatistics:
        """Score the held-out normal images and keep the label-free threshold and the score and
        map normalisation (``metrics.normalization``); they travel in the checkpoint."""
        predictions = self.validation_epoch(loader)
        if np.any(predictions.labels != 0):
            raise ValueError("calibrate() takes normal images only (the validation split of the training set)")
        statistics = normal_statistics(predictions.scores, predictions.anomaly_maps, self.train_config.threshold_percentile)
        self.normal_statistics = statistics
        self.thresholds[statistics.threshold_name] = statistics.image_threshold
        self.threshold, self.threshold_source = statistics.image_threshold, statistics.threshold_name
        self.map_range = statistics.map_display_range()
        return statistics

    @torch.no_grad()
    def validation_epoch(self, loader: DataLoader) -> Predictions:
        self.model.eval()
        self.on_validation_start()
        scores, labels, maps, masks, paths, defect_types = [], [], [], [], [], []
        has_masks = bool(getattr(loader.dataset, "has_masks", True))
        model_seconds = 0.0
        for batch in tqdm(loader, desc=f"{self.model_type} evaluate", leave=False,
                          disable=not self.train_config.progress, dynamic_ncols=True):
            batch = self.to_device(batch)
            start = time.perf_counter()
            output = self.validation_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            model_seconds += time.perf_counter() - start
            scores.append(output["pred_score"].detach().float().reshape(-1).cpu())
            labels.append(batch["label"].cpu())
            anomaly_map = output.get("anomaly_map")
            if anomaly_map is not None:
                target_size = tuple(batch["mask"].shape[-2:])
                anomaly_map = anomaly_map.detach().float().reshape(-1, 1, *anomaly_map.shape[-2:])
                if tuple(anomaly_map.shape[-2:]) != target_size:
                    anomaly_map = F.interpolate(anomaly_map, size=target_size, mode="bilinear", align_corners=False)
                maps.append(anomaly_map[:, 0].cpu())
            masks.append(batch["mask"].cpu().to(torch.uint8))
            paths.extend(batch["path"])
            defect_types.extend(batch.get("defect_type", [""] * len(batch["path"])))
        self.on_validation_end()
        return Predictions(
            scores=torch.cat(scores).numpy(),
            labels=torch.cat(labels).numpy().astype(np.int64),
            anomaly_maps=torch.cat(maps).numpy() if maps else None,
            masks=torch.cat(masks).numpy() if has_masks else None,
            paths=paths,
            defect_types=list(defect_types),
            model_seconds=model_seconds,
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores and maps for a batch of already-transformed images (B, 3, H, W)."""
        self.model.eval()
        return self.validation_step({"image": images.to(self.device)})

    # ----------------------------------------------------------------- checkpoints
    def save_model(self, path: str | Path) -> Path:
        """Weights, optimiser/scheduler state, full config, seed, RNG state and library versions."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "model_type": self.model_type,
            "trainer_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "model_config": dict(self.model_config),
            "train_config": dataclasses.asdict(self.train_config),
            "seed": self.train_config.seed,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
            "early_stopper_state": self.early_stopper.state_dict() if self.early_stopper is not None else None,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "thresholds": dict(self.thresholds),
            "normal_statistics": self.normal_statistics.as_dict() if self.normal_statistics is not None else None,
            "map_range": list(self.map_range) if self.map_range is not None else None,
            "rng_state": capture_rng_state(),
            "extra_state": self.extra_state(),
            "versions": library_versions(),
        }
        temporary = path.with_suffix(path.suffix + ".tmp")
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)  # never leave a half-written checkpoint behind
        return path

    def load_model(self, path: str | Path, restore_rng: bool = False) -> "BaseTrainer":
        """Load a checkpoint written by :meth:`save_model` into this trainer."""
        checkpoint = read_checkpoint(path)
        state = checkpoint["model_state"]
        resize_buffers_to_state_dict(self.model, state)
        self.model.load_state_dict(state)
        self.model.to(self.device)
        if checkpoint.get("optimizer_state"):
            self.setup_optimization()
        if self.optimizer is not None and checkpoint.get("optimizer_state"):
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.scheduler is not None and checkpoint.get("scheduler_state"):
            self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if self.early_stopper is not None and checkpoint.get("early_stopper_state"):
            self.early_stopper.load_state_dict(checkpoint["early_stopper_state"])
        self.epoch = int(checkpoint.get("epoch", 0))
        self.global_step = int(checkpoint.get("global_step", 0))
        self.history = list(checkpoint.get("history", []))
        self.threshold = checkpoint.get("threshold")
        self.threshold_source = checkpoint.get("threshold_source")
        self.thresholds = dict(checkpoint.get("thresholds") or {})
        statistics = checkpoint.get("normal_statistics")
        self.normal_statistics = NormalStatistics.from_dict(statistics) if statistics else None
        self.map_range = tuple(checkpoint["map_range"]) if checkpoint.get("map_range") else None
        self.load_extra_state(checkpoint.get("extra_state") or {})
        if restore_rng:
            restore_rng_state(checkpoint["rng_state"])
        return self

    # ----------------------------------------------------------------- reports
    def save_results(self, path: str | Path, metrics: dict[str, Any], predictions: Predictions, header: dict[str, Any]) -> Path:
        """``results_..._thresholds.txt``: header, metrics and every threshold candidate."""
        return write_run_results(path, metrics, predictions, self.thresholds, header, self.threshold_source, self.threshold)

    def save_histogram(self, path: str | Path, predictions: Predictions, title: str = "") -> Path:
        """``histogram_..._scores.png``: normal vs anomalous scores with the thresholds marked."""
        return save_run_histogram(path, predictions, self.thresholds, title)

    def save_maps(self, output_dir: str | Path, prefix: str, predictions: Predictions, images: list[np.ndarray],
                  max_per_class: int = 5) -> list[Path]:
        """``{prefix}_normal_0001.png``, ``{prefix}_anomaly_0001.png``, ... (image, map, overlay, mask)."""
        return save_run_maps(output_dir, prefix, predictions, images, self.threshold, self.map_range, max_per_class)


class FeatureBankTrainer(BaseTrainer):
    """Memory-bank and feature-statistics models (PatchCore, PaDiM, DFKDE, DFM): one pass over the
    normal images collects features without gradients, and the model is fitted on all of them at
    the end of the epoch. Subclasses say what to collect and how to fit."""

    def __init__(self, train_config: TrainConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, **model_options: Any) -> None:
        super().__init__(train_config, device, **model_options)
        self.collected: list[torch.Tensor] = []

    def collect(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one training batch (kept on the CPU until the end of the epoch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement collect")

    def fit_features(self, features: torch.Tensor) -> None:
        """Fit the model on the features of every training image (concatenated along dim 0)."""
        raise NotImplementedError(f"{type(self).__name__} must implement fit_features")

    def on_train_start(self) -> None:
        self.collected = []

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        with torch.no_grad():
            self.collected.append(self.collect(batch["image"]).cpu())
        return {}

    def on_train_end(self) -> None:
        features = torch.cat(self.collected)
        self.collected = []
        self.fit_features(features)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Could not read checkpoint {path}: {error}. Is it a complete file written by anomalyzoo?") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an anomalyzoo checkpoint (format {CHECKPOINT_FORMAT})")
    return checkpoint
