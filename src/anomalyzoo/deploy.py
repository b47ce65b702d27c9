"""Export a trained model to ONNX, OpenVINO or TorchScript, and run exported models.

One graph goes from the image tensor that training saw (resized to ``img_size``, ImageNet-
normalised when the run used ``normalize``) to ``pred_score`` (B,) and, where the model makes one,
``anomaly_map`` (B, H, W): the trainer's own scoring path (``validation_step``, tiling included
when the run used it), traced once. Beside it ``metadata.json`` carries what a deployment needs to
turn raw scores into decisions (model, img_size, normalize, the decision threshold and every stored
candidate, the label-free score normalisation, the map display range, library versions), so an
exported model makes the same decisions as its checkpoint.

- ONNX: torch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``), opset 17, the
  batch axis dynamic. It is the exporter that handles every exportable model here in about a second;
  the newer ``torch.export`` path takes several times longer for the same graph.
- OpenVINO: the ONNX graph read by ``openvino.convert_model`` and saved as IR (``model.xml`` /
  ``model.bin``) with fp32 weights (``save_model`` would halve them to fp16 by default, which moves
  scores by up to ~1e-3) and compiled for f32 inference: one graph, so both backends run the
  same operations.
- TorchScript: ``torch.jit.trace`` of the same wrapper (``model.pt``).

Exported graphs are checked at export time (``verify=True``): the exported file is run on a batch
whose size differs from the traced one and compared with the torch model (1e-4 relative), so a graph
that only works for one batch size, or scores differently, is never written silently.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anomalyzoo.metrics.normalization import NormalStatistics
from anomalyzoo.models.components.trainer import BaseTrainer, library_versions, package_version

EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
METADATA_FILE = "metadata.json"
METADATA_FORMAT = "anomalyzoo-export-v1"
ONNX_OPSET = 17
EXPORT_RTOL = 1e-4  # exported scores and maps equal the torch model's within this relative tolerance
DEPLOY_HINT = "pip install 'anomalyzoo[deploy]'"

# Why a model has no ONNX (nor OpenVINO) graph; TorchScript, which runs the same torch operations,
# exports every model (shown by `anomalyzoo export` and the README).
NOT_EXPORTABLE: dict[str, str] = {
    "fastflow-deit": "timm resamples DeiT's position embedding with antialiased bicubic interpolation "
                     "(aten::_upsample_bicubic2d_aa), which has no ONNX operator",
    "dsr": "its vector quantisers pick codes by argmin over distances: ONNX Runtime and OpenVINO sum those "
           "distances in another order, near-ties flip to other codes and the map moves by ~1e-3",
}


class ExportError(ValueError):
    pass


class ScoringGraph(nn.Module):
    """The trainer's scoring path as a module with tensor outputs: image -> (pred_score[, anomaly_map])."""

    def __init__(self, trainer: BaseTrainer, with_map: bool) -> None:
        super().__init__()
        self.model = trainer.model  # registered, so tracing sees its parameters and buffers
        self.trainer = [trainer]  # a list: not a submodule
        self.with_map = with_map

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.trainer[0].validation_step({"image": images})
        score = output["pred_score"].reshape(-1)
        if self.with_map:
            return score, output["anomaly_map"].reshape(images.shape[0], images.shape[-2], images.shape[-1])
        return (score,)


def require(module: str) -> Any:
    """Import an optional deployment dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is not installed: {DEPLOY_HINT}") from error


def export_metadata(trainer: BaseTrainer, export_format: str, outputs: list[str], source: str | None) -> dict[str, Any]:
    config = trainer.train_config
    versions = library_versions()
    for name in ("onnx", "onnxruntime", "openvino"):
        versions[name] = package_version(name)
    return {
        "format": METADATA_FORMAT,
        "export_format": export_format,
        "model_file": MODEL_FILES[export_format],
        "model": trainer.model_type,
        "trainer_class": f"{type(trainer).__module__}.{type(trainer).__qualname__}",
        "model_config": trainer.model_config,
        "img_size": config.img_size,
        "normalize": config.normalize,
        "crop_pct": config.crop_pct,  # resize to img_size / crop_pct, centre-crop img_size (Dinomaly -392)
        "tiling": config.tiling,
        "input": {"name": "image", "shape": ["batch", 3, config.img_size, config.img_size], "dtype": "float32"},
        "outputs": outputs,
        "threshold": trainer.threshold,
        "threshold_source": trainer.threshold_source,
        "thresholds": dict(trainer.thresholds),
        "normal_statistics": trainer.normal_statistics.as_dict() if trainer.normal_statistics is not None else None,
        "map_range": list(trainer.map_range) if trainer.map_range is not None else None,
        "checkpoint": source,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions,
    }


def export_trainer(trainer: BaseTrainer, export_format: str = "onnx", output_dir: str | Path = "exported",
                   verify: bool = True, source: str | None = None) -> Path:
    """Write ``output_dir/<model file>`` and ``output_dir/metadata.json``; return the model file."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if trainer.model_type in NOT_EXPORTABLE and export_format != "torchscript":
        raise ExportError(f"{trainer.model_type} cannot be exported to {export_format}: {NOT_EXPORTABLE[trainer.model_type]} "
                          f"(--format torchscript works)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.eval()
    size = trainer.train_config.img_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=generator).to(trainer.device)
    with torch.no_grad():
        reference = trainer.validation_step({"image": example})
    with_map = reference.get("anomaly_map") is not None
    outputs = ["pred_score", "anomaly_map"] if with_map else ["pred_score"]
    graph = ScoringGraph(trainer, with_map).eval()
    model_path = output_dir / MODEL_FILES[export_format]
    if export_format == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(graph, (example,), check_trace=False)
        traced.save(str(model_path))
    else:
        onnx_path = model_path if export_format == "onnx" else None
        with tempfile.TemporaryDirectory() as scratch:
            onnx_path = onnx_path or Path(scratch) / "model.onnx"
            export_onnx(graph, example, onnx_path, outputs)
            if export_format == "openvino":
                openvino = require("openvino")
                # save_model halves the weights to fp16 by default: keep fp32, or the scores move by ~1e-3
                openvino.save_model(openvino.convert_model(str(onnx_path)), str(model_path), compress_to_fp16=False)
    metadata = export_metadata(trainer, export_format, outputs, source)
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
    if verify:
        try:
            verify_export(trainer, output_dir)
        except ExportError:  # never leave a graph that scores differently where it could be deployed
            for name in (MODEL_FILES[export_format], METADATA_FILE, "model.bin"):
                (output_dir / name).unlink(missing_ok=True)
            raise
    return model_path


def export_onnx(graph: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    require("onnx")
    dynamic_axes = {"image": {0: "batch"}, "pred_score": {0: "batch"}}
    if "anomaly_map" in outputs:
        dynamic_axes["anomaly_map"] = {0: "batch"}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=outputs, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)


def verify_export(trainer: BaseTrainer, output_dir: Path, batch_size: int = 3, rtol: float = EXPORT_RTOL) -> None:
    """Run the exported graph on a batch of another size than the traced one and compare it with
    the torch model; an export that scores differently is an :class:`ExportError` naming the gap."""
    size = trainer.train_config.img_size
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.validation_step({"image": images.to(trainer.device)})
    exported = load_exported(output_dir, device=str(trainer.device))
    got = exported.score(images)
    for key, values in got.items():
        reference = expected[key].detach().float().cpu().numpy().reshape(values.shape)
        gap = relative_gap(values, reference)
        if not gap <= rtol:
            raise ExportError(f"the exported {exported.export_format} graph of {trainer.model_type} gives {key} "
                              f"{gap:.2e} away (relative) from the torch model (tolerance {rtol:g})")


def relative_gap(values: np.ndarray, reference: np.ndarray) -> float:
    """max |a - b| / max |b|: the gap relative to the output's scale (maps have zeros)."""
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(values.astype(np.float64) - reference.astype(np.float64)).max() / scale)


def export(checkpoint: str | Path, format: str = "onnx", output: str | Path | None = None,  # noqa: A002
           device: str | None = "cpu", verify: bool = True) -> Path:
    """``anomalyzoo.export``: a checkpoint to ``output`` (default ``<checkpoint folder>/export_<format>``)."""
    from anomalyzoo.predict import load_trainer

    checkpoint = Path(checkpoint)
    trainer = load_trainer(checkpoint, device)
    output_dir = Path(output) if output is not None else checkpoint.parent / f"export_{format}"
    return export_trainer(trainer, format, output_dir, verify=verify, source=str(checkpoint))


# ---------------------------------------------------------------------------- running exported models
@dataclass
class ExportedModel:
    """An exported graph and its metadata, with the attributes ``predict`` reads from a trainer."""

    metadata: dict[str, Any]
    export_format: str
    runner: Any
    img_size: int = 0
    normalize: bool = True
    crop_pct: float = 1.0
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.img_size = int(self.metadata["img_size"])
        self.normalize = bool(self.metadata["normalize"])
        self.crop_pct = float(self.metadata.get("crop_pct", 1.0))
        self.outputs = list(self.metadata["outputs"])
        statistics = self.metadata.get("normal_statistics")
        self.normal_statistics = NormalStatistics.from_dict(statistics) if statistics else None
        self.threshold = self.metadata.get("threshold")
        self.threshold_source = self.metadata.get("threshold_source")
        self.thresholds = dict(self.metadata.get("thresholds") or {})
        self.map_range = tuple(self.metadata["map_range"]) if self.metadata.get("map_range") else None
        self.model_type = self.metadata["model"]

    def score(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"pred_score": (B,), "anomaly_map": (B, H, W)}`` as float32 arrays."""
        return dict(zip(self.outputs, self.runner(images.detach().float().cpu().contiguous())))


def read_metadata(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(metadata, export folder) for an export folder, its metadata.json or its model file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        raise FileNotFoundError(f"{metadata_path} does not exist: point at a folder written by `anomalyzoo export`")
    metadata = json.loads(metadata_path.read_text())
    if metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{metadata_path} is not an anomalyzoo export ({METADATA_FORMAT})")
    return metadata, folder


def load_exported(path: str | Path, backend: str | None = None, device: str | None = "cpu",
                  num_threads: int | None = None) -> ExportedModel:
    """Open an export folder with ``backend`` (onnxruntime for ONNX, openvino for OpenVINO IR or
    ONNX, torch for TorchScript; default: the one of its format)."""
    metadata, folder = read_metadata(path)
    export_format = metadata["export_format"]
    backend = backend or {"onnx": "onnxruntime", "openvino": "openvino", "torchscript": "torch"}[export_format]
    model_path = folder / metadata["model_file"]
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} (named in {folder / METADATA_FILE}) is missing")
    if backend == "onnxruntime":
        if export_format != "onnx":
            raise ValueError(f"onnxruntime runs ONNX exports; {folder} holds a {export_format} export")
        runner = onnxruntime_runner(model_path, num_threads)
    elif backend == "openvino":
        if export_format not in ("onnx", "openvino"):
            raise ValueError(f"openvino runs ONNX and OpenVINO exports; {folder} holds a {export_format} export")
        runner = openvino_runner(model_path, num_threads)
    elif backend == "torch":
        if export_format != "torchscript":
            raise ValueError(f"the torch backend runs checkpoints and TorchScript exports; {folder} holds {export_format}")
        runner = torchscript_runner(model_path, device)
    else:
        raise ValueError(f"backend must be torch, onnxruntime or openvino, got {backend!r}")
    return ExportedModel(metadata, export_format, runner)


def onnxruntime_runner(model_path: Path, num_threads: int | None = None):
    onnxruntime = require("onnxruntime")
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> list[np.ndarray]:
        return session.run(None, {"image": images.numpy()})

    return run


def openvino_runner(model_path: Path, num_threads: int | None = None):
    openvino = require("openvino")
    core = openvino.Core()
    # f32 and the accuracy mode: no bf16/f16 or other shortcuts, the scores must not move
    config = {"INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "ACCURACY"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = num_threads
    compiled = core.compile_model(str(model_path), "CPU", config)
    request = compiled.create_infer_request()

    def run(images: torch.Tensor) -> list[np.ndarray]:
        results = request.infer({0: images.numpy()})
        return [np.asarray(results[output]) for output in compiled.outputs]

    return run


def torchscript_runner(model_path: Path, device: str | None = "cpu"):
    module = torch.jit.load(str(model_path), map_location=device or "cpu").eval()

    def run(images: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            return [output.float().cpu().numpy() for output in module(images.to(device or "cpu"))]

    return run
