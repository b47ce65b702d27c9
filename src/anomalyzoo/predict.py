"""Load a saved run and score new images: ``anomalyzoo predict --checkpoint PATH IMAGES...``.

``--backend torch`` (default) runs a checkpoint (or a TorchScript export); ``onnxruntime`` and
``openvino`` run an export folder written by ``anomalyzoo export``, or export a checkpoint on the
fly (into a temporary folder, checked against torch as every export is). Every backend reads the
same threshold and normalisation (the checkpoint's, or the export's ``metadata.json``)."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anomalyzoo.data.images import find_images
from anomalyzoo.data.transforms import IMAGE_EXTENSIONS, ImageReadError, denormalize, image_to_tensor, load_rgb_image
from anomalyzoo.models.components.trainer import BaseTrainer, TrainConfig, read_checkpoint
from anomalyzoo.registry import ModelRegistry
from anomalyzoo.report import save_anomaly_map_figure

BACKENDS = ("torch", "onnxruntime", "openvino")


class TrainerScorer:
    """A loaded trainer behind the interface of :class:`anomalyzoo.deploy.ExportedModel`."""

    def __init__(self, trainer: BaseTrainer) -> None:
        self.trainer = trainer
        self.img_size = trainer.train_config.img_size
        self.normalize = trainer.train_config.normalize
        self.crop_pct = trainer.train_config.crop_pct
        self.normal_statistics = trainer.normal_statistics
        self.threshold, self.threshold_source = trainer.threshold, trainer.threshold_source
        self.thresholds = trainer.thresholds
        self.map_range = trainer.map_range
        self.model_type = trainer.model_type

    def score(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        output = self.trainer.predict(images)
        return {key: value.float().cpu().numpy() for key, value in output.items()
                if key in ("pred_score", "anomaly_map") and value is not None}


def is_export(path: Path) -> bool:
    from anomalyzoo.deploy import METADATA_FILE

    return (path / METADATA_FILE).is_file() if path.is_dir() else (path.parent / METADATA_FILE).is_file() and path.suffix != ".pth"


def open_model(model_path: str | Path, backend: str = "torch", device: str | None = None,
               num_threads: int | None = None, scratch_dir: str | Path | None = None,
               tiling: Sequence[int] | None = None) -> Any:
    """A scorer (``score(images) -> {"pred_score", "anomaly_map"}`` as arrays, with the threshold
    attributes ``choose_threshold`` reads) for a checkpoint or an export folder on ``backend``;
    ``tiling`` re-tiles a checkpoint at predict time (:func:`with_tiling`)."""
    from anomalyzoo import deploy

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    model_path = Path(model_path)
    if is_export(model_path):
        if tiling is not None:
            raise ValueError(f"{model_path} is an export: its tiling is part of the graph (re-export a checkpoint)")
        return deploy.load_exported(model_path, backend, device, num_threads)
    if backend == "torch":
        return TrainerScorer(with_tiling(load_trainer(model_path, device), tiling))
    if scratch_dir is None:
        raise ValueError(f"{model_path} is a checkpoint: export it first (anomalyzoo export --checkpoint {model_path}) "
                         f"to run it on {backend}")
    trainer = with_tiling(load_trainer(model_path, "cpu"), tiling)
    deploy.export_trainer(trainer, "onnx", scratch_dir, source=str(model_path))
    return deploy.load_exported(scratch_dir, backend, "cpu", num_threads)


def with_tiling(trainer: BaseTrainer, tiling: Sequence[int] | None) -> BaseTrainer:
    """``tiling = [img_size, stride]`` at predict time: images are loaded at ``img_size`` and
    scored in tiles of the size the model was fitted on (its training tile, else its training
    ``img_size``) every ``stride`` pixels; the maps are stitched (``components.tiler``)."""
    if tiling is None:
        return trainer
    img_size, stride = (int(value) for value in tiling)
    config = trainer.train_config
    tile_size = trainer.tiler.tile_size if trainer.tiler is not None else config.img_size
    new_config = dataclasses.replace(config, img_size=img_size, tiling=[tile_size, stride])
    trainer.tiler = trainer.make_tiler(new_config)
    trainer.train_config = new_config
    return trainer


def load_trainer(checkpoint_path: str | Path, device: str | None = None) -> BaseTrainer:
    """Rebuild the trainer a checkpoint came from and load its state.

    The registry entry named in the checkpoint is used; a trainer built directly (its model type
    is not a registry name) is rebuilt from the trainer class the checkpoint records, which must
    live in this package. The backbone is built without pretrained weights (``pretrained=False``):
    the checkpoint holds every weight, so predicting needs no backbone file and no network.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    model_type = checkpoint["model_type"]
    model_config = dict(checkpoint["model_config"])
    train_config = TrainConfig.from_dict(checkpoint["train_config"])
    trainer_class = checkpoint_trainer_class(checkpoint)
    pretrained = model_config.get("pretrained")
    if "pretrained" in trainer_class.option_defaults():
        model_config["pretrained"] = False
    if ModelRegistry.is_registered(model_type):
        trainer = ModelRegistry.get_trainer(model_type, model_config, train_config, device)
    else:
        trainer = trainer_class(train_config=train_config, device=device, **model_config)
        trainer.model_type = model_type
    if pretrained is not None:
        trainer.model_options["pretrained"] = pretrained  # record what the run used, not how it was rebuilt
    return trainer.load_model(checkpoint_path)


def checkpoint_trainer_class(checkpoint: dict[str, Any]) -> type[BaseTrainer]:
    """The registry's trainer class for the checkpoint's model type, else the recorded class path
    (only classes of this package are imported from a checkpoint)."""
    if ModelRegistry.is_registered(checkpoint["model_type"]):
        return ModelRegistry.get_trainer_class(checkpoint["model_type"])
    module_name, _, class_name = str(checkpoint.get("trainer_class", "")).rpartition(".")
    if not module_name.startswith("anomalyzoo."):
        raise ValueError(f"checkpoint model '{checkpoint['model_type']}' is not registered and its trainer class "
                         f"'{checkpoint.get('trainer_class')}' is not part of anomalyzoo")
    return getattr(importlib.import_module(module_name), class_name)


def choose_threshold(trainer: Any, threshold: str | float = "normal") -> tuple[float | None, str]:
    """(value, name) of the decision threshold: ``"normal"`` is the label-free threshold stored at
    training (a percentile of held-out normal scores), ``"f1"`` the F1-optimal one of the test
    evaluation, a number is used as given. Without a stored normal threshold (a run trained with
    val_fraction=0) "normal" falls back to whatever the run stored, and says so."""
    if isinstance(threshold, (int, float)):
        return float(threshold), "given"
    text = str(threshold).strip().lower()
    try:
        return float(text), "given"
    except ValueError:
        pass
    if text == "f1":
        if "f1_optimal" not in trainer.thresholds:
            raise ValueError("this checkpoint stores no F1-optimal threshold (it was saved before a test evaluation)")
        return trainer.thresholds["f1_optimal"], "f1_optimal"
    if text != "normal":
        raise ValueError(f"threshold must be 'normal', 'f1' or a number, got {threshold!r}")
    if trainer.normal_statistics is not None:
        return trainer.normal_statistics.image_threshold, trainer.normal_statistics.threshold_name
    print(f"note: the checkpoint has no label-free threshold (trained with val_fraction=0); using {trainer.threshold_source}")
    return trainer.threshold, trainer.threshold_source or "none"


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(image file, output stem) for every input: a file as it is, a folder searched recursively.
    The stem mirrors where the image came from (``<folder name>/<relative path>`` for folders, the
    file name for files) and is made unique, so that two ``000.png`` from different folders never
    write the same map."""
    pairs: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = find_images(item)
            if not files:
                raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under folder {item}")
            pairs += [(path, Path(item.resolve().name) / path.relative_to(item).with_suffix("")) for path in files]
        elif item.is_file():
            pairs.append((item, Path(item.stem)))
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    seen: dict[Path, int] = {}
    unique: list[tuple[Path, Path]] = []
    for path, stem in pairs:
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        unique.append((path, stem if count == 1 else stem.with_name(f"{stem.name}-{count}")))
    return unique


def free_output_dir(output_dir: Path, overwrite: bool) -> Path:
    """``output_dir`` when new, empty or ``overwrite``; else the first free ``output_dir-N``."""
    if overwrite or not output_dir.exists() or not any(output_dir.iterdir()):
        return output_dir
    number = 2
    while (candidate := output_dir.with_name(f"{output_dir.name}-{number}")).exists():
        number += 1
    return candidate


def predict_images(
    checkpoint_path: str | Path,
    image_paths: Sequence[str | Path],
    output_dir: str | Path,
    device: str | None = None,
    batch_size: int = 8,
    threshold: str | float = "normal",
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    backend: str = "torch",
    num_threads: int | None = None,
    tiling: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Score every image of ``image_paths`` (files, or folders searched recursively); write
    ``<stem>_anomaly_map.png`` (figure) and ``.npy`` mirroring the inputs' relative paths, and
    ``scores.csv`` (path, score, normalized score, verdict, threshold, map, error).

    An existing, non-empty ``output_dir`` is never written into unless ``overwrite``: the results
    go to ``output_dir-2`` (``-3``, ...), named in each row's ``map`` and printed by the CLI. An
    image that cannot be read gets a row with its error and the rest are scored; ``strict`` raises
    on the first instead. ``normalized_score`` is 0.5 at the label-free threshold for every model
    (see ``metrics.normalization``); it is empty for checkpoints trained without a validation split.
    ``checkpoint_path`` is a checkpoint or an export folder; ``backend`` runs it (module docstring).
    Images go through the model ``batch_size`` at a time, with a progress bar over the images.
    ``tiling=[img_size, stride]`` scores a checkpoint tile by tile at ``img_size`` (:func:`with_tiling`)."""
    inputs = expand_inputs(image_paths)
    with tempfile.TemporaryDirectory(prefix="anomalyzoo-export-") as scratch:
        model = open_model(checkpoint_path, backend, device, num_threads, scratch, tiling)
        if backend != "torch" and not is_export(Path(checkpoint_path)):
            print(f"note: exported {checkpoint_path} to ONNX for {backend} (checked against torch); "
                  f"`anomalyzoo export` keeps the export for the next run")
        return score_inputs(model, inputs, output_dir, batch_size, threshold, overwrite, strict, progress)


def score_inputs(model: Any, inputs: list[tuple[Path, Path]], output_dir: str | Path, batch_size: int,
                 threshold: str | float, overwrite: bool, strict: bool, progress: bool) -> list[dict[str, Any]]:
    threshold_value, threshold_name = choose_threshold(model, threshold)
    output_dir = free_output_dir(Path(output_dir), overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = model.map_range if model.map_range is not None else (None, None)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(inputs), desc="predict", disable=not progress or len(inputs) < 2, dynamic_ncols=True)
    for start in range(0, len(inputs), batch_size):
        chunk, images = [], []
        for path, stem in inputs[start:start + batch_size]:
            try:
                images.append(image_to_tensor(load_rgb_image(path), model.img_size, model.normalize,
                                              model.crop_pct))
                chunk.append((path, stem))
            except ImageReadError as error:
                if strict:
                    raise
                rows.append(unreadable_row(path, error, threshold_value, threshold_name))
        bar.update(len(inputs[start:start + batch_size]))
        if not chunk:
            continue
        batch = torch.stack(images)
        output = model.score(batch)
        scores = output["pred_score"]
        maps = output.get("anomaly_map")
        for i, (path, stem) in enumerate(chunk):
            score = float(scores[i])
            verdict = "" if threshold_value is None else ("anomalous" if score >= threshold_value else "normal")
            normalized = "" if model.normal_statistics is None else float(model.normal_statistics.normalize_scores(score))
            row: dict[str, Any] = {"path": str(path), "score": score, "normalized_score": normalized, "verdict": verdict,
                                   "threshold": threshold_value, "threshold_name": threshold_name, "map": "", "error": ""}
            if maps is not None:
                target = output_dir / stem.parent / f"{stem.name}_anomaly_map"
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target.with_suffix(".npy"), maps[i].astype(np.float32))
                figure = save_anomaly_map_figure(
                    target.with_suffix(".png"), denormalize(batch[i], model.normalize), maps[i],
                    None, score, threshold=threshold_value, vmin=vmin, vmax=vmax, title=path.name,
                )
                row["map"] = str(figure)
            rows.append(row)
    bar.close()
    order = {path: index for index, (path, _stem) in enumerate(inputs)}
    rows.sort(key=lambda row: order[Path(row["path"])])
    with open(output_dir / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def unreadable_row(path: Path, error: Exception, threshold: float | None, threshold_name: str) -> dict[str, Any]:
    return {"path": str(path), "score": float("nan"), "normalized_score": "", "verdict": "error",
            "threshold": threshold, "threshold_name": threshold_name, "map": "", "error": str(error)}
