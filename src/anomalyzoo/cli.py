"""Command line: ``anomalyzoo train | list | demo | predict | export | distill-teacher | pretrain-dsr | sweep | summary | report``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any

from anomalyzoo.registry import ModelRegistry
from anomalyzoo.settings import get_settings, set_globals


def parse_value(text: str) -> Any:
    """``--set key=value`` values: Python literals where they parse (3, 0.1, True, [..]), else text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-dir", help="DATASET_DIR (default $ANOMALYZOO_DATASET_DIR or ./datasets)")
    parser.add_argument("--backbone-dir", help="BACKBONE_DIR (default $ANOMALYZOO_BACKBONE_DIR or ./backbones)")
    parser.add_argument("--output-dir", help="OUTPUT_DIR (default $ANOMALYZOO_OUTPUT_DIR or ./outputs)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-workers", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalyzoo", description="Unsupervised visual anomaly detection")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one or more models on one or more categories")
    train.add_argument("--dataset", required=True, choices=["mvtec", "visa", "btad", "custom", "folder"])
    train.add_argument("--category", required=True, nargs="+", help="category (custom: <dataset>/<category>)")
    train.add_argument("--model", required=True, nargs="+", help="registry name(s); see `anomalyzoo list`")
    train.add_argument("--num-epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--img-size", type=int)
    train.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    train.add_argument("--backbone")
    train.add_argument("--layers", nargs="+")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other training or model option, e.g. --set coreset_ratio=0.01")
    train.add_argument("--device")
    train.add_argument("--normal-dir", help="folder dataset: the normal images")
    train.add_argument("--abnormal-dir", nargs="+", help="folder dataset: folder(s) of defective images")
    train.add_argument("--mask-dir", help="folder dataset: masks paired by file stem (optionally '_mask')")
    train.add_argument("--normal-test-dir", help="folder dataset: normal test images (else a seeded split)")
    train.add_argument("--multiclass", action="store_true",
                       help="train ONE model on the union of the --category list (metrics per category and their mean)")
    train.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    train.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    add_global_options(train)

    commands.add_parser("list", help="registered models by family, with their defaults")

    demo = commands.add_parser("demo", help="synthetic dataset + PatchCore and PaDiM, all outputs")
    demo.add_argument("--output-dir", default="anomalyzoo_demo")
    demo.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--img-size", type=int, default=256)

    predict = commands.add_parser("predict", help="score images with a saved or exported model")
    predict.add_argument("--checkpoint", required=True, help="a checkpoint (.pth) or a folder written by `anomalyzoo export`")
    predict.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                         help="torch: the checkpoint (or a TorchScript export); onnxruntime / openvino: an export "
                              "folder, or the checkpoint exported on the fly (pip install 'anomalyzoo[deploy]')")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--num-threads", type=int, help="CPU threads of the onnxruntime / openvino backend")
    predict.add_argument("--tiling", type=int, nargs=2, metavar=("IMG_SIZE", "STRIDE"),
                         help="load images at IMG_SIZE and score them in tiles of the model's training size every "
                              "STRIDE pixels (padim, patchcore, stfpm, reverse-distillation)")
    predict.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--output-dir", default="predictions",
                         help="where maps and scores.csv go (an existing one is kept: a new '-N' folder is used)")
    predict.add_argument("--overwrite", action="store_true", help="write into an existing output folder")
    predict.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    predict.add_argument("--device")
    predict.add_argument("--threshold", default="normal",
                         help="'normal' (label-free, from held-out normal training images; default), "
                              "'f1' (F1-optimal on the training run's test set) or a number")

    export = commands.add_parser("export", help="a checkpoint as an ONNX, OpenVINO or TorchScript graph + metadata.json")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--format", choices=["onnx", "openvino", "torchscript"], default="onnx")
    export.add_argument("--output", help="folder of the graph and metadata.json (default <checkpoint folder>/export_<format>)")
    export.add_argument("--device", default="cpu")

    distill = commands.add_parser("distill-teacher", help="make EfficientAD's PDN teacher by distilling a pretrained backbone")
    distill.add_argument("--images", required=True, nargs="+", help="folder(s) of images to distil on (searched recursively)")
    distill.add_argument("--model-size", choices=["small", "medium"], default="small")
    distill.add_argument("--backbone", default="wide_resnet50_2")
    distill.add_argument("--num-steps", type=int, default=10000)
    distill.add_argument("--batch-size", type=int, default=8)
    distill.add_argument("--img-size", type=int, default=256)
    distill.add_argument("--output", help="teacher file (default BACKBONE_DIR/efficientad/pretrained_teacher_<size>.pth)")
    distill.add_argument("--overwrite", action="store_true")
    distill.add_argument("--device")
    add_global_options(distill)

    vq = commands.add_parser("pretrain-dsr", help="train DSR's VQ-VAE (its two codebooks) on a folder of images")
    vq.add_argument("--images", required=True, nargs="+", help="folder(s) of images (searched recursively); "
                                                               "natural images are best, as the paper's ImageNet")
    vq.add_argument("--num-steps", type=int, default=10000)
    vq.add_argument("--batch-size", type=int, default=8)
    vq.add_argument("--img-size", type=int, default=256)
    vq.add_argument("--output", help="VQ-VAE file (default BACKBONE_DIR/dsr/vq_model_pretrained_128_4096.pckl)")
    vq.add_argument("--overwrite", action="store_true")
    vq.add_argument("--device")
    add_global_options(vq)
    add_sweep_parser(commands)
    add_summary_parser(commands)
    add_report_parser(commands)
    return parser


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as overrides (``-`` in keys read as ``_``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = parse_value(value)
    return overrides


def command_train(args: argparse.Namespace) -> int:
    from anomalyzoo.train import train, train_models

    set_globals(dataset_dir=args.dataset_dir, backbone_dir=args.backbone_dir, output_dir=args.output_dir,
                seed=args.seed, num_workers=args.num_workers)
    overrides: dict[str, Any] = {"num_epochs": args.num_epochs, "batch_size": args.batch_size, "img_size": args.img_size,
                                 "normalize": args.normalize, "backbone": args.backbone, "layers": args.layers,
                                 "device": args.device, "overwrite": args.overwrite, "resume": args.resume,
                                 "normal_dir": args.normal_dir, "abnormal_dir": args.abnormal_dir, "mask_dir": args.mask_dir,
                                 "normal_test_dir": args.normal_test_dir}
    overrides.update(parse_set_options(args.set))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for model in args.model:
        ModelRegistry.get(model)
    if args.multiclass:
        return command_train_multiclass(args, overrides)
    if len(args.category) == 1 and len(args.model) == 1:
        result = train(args.dataset, args.category[0], args.model[0], **overrides)
        print(json.dumps({k: result[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max",
                                                "threshold", "fit_seconds", "inference_ms_per_image", "output_dir")}, indent=2))
        return 0
    rows = train_models(args.dataset, args.category, args.model, **overrides)
    return 1 if any(row.get("error") for row in rows) else 0


def command_train_multiclass(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``--multiclass``: one model per --model on the union of the categories; prints the summary."""
    from pathlib import Path

    from anomalyzoo.train import train

    for model in args.model:
        result = train(args.dataset, list(args.category), model, **overrides)
        print(f"{model} on {', '.join(result['categories'])} (one model): {result['output_dir']}")
        print((Path(result["output_dir"]) / "summary.md").read_text())
    return 0


def command_list() -> int:
    for family, names in ModelRegistry.list_by_category().items():
        print(f"{family}:")
        for name in names:
            model = ", ".join(f"{k}={v}" for k, v in ModelRegistry.get_model_config(name).items())
            train = ModelRegistry.get_train_config(name)
            crop = f" crop_pct={train['crop_pct']:g}" if train.get("crop_pct", 1.0) != 1.0 else ""
            print(f"  {name:<28} {model}  | epochs={train['num_epochs']} batch={train['batch_size']} "
                  f"img={train['img_size']}{crop} normalize={train['normalize']}")
            paper = ModelRegistry.get(name).paper_schedule
            if paper:
                values = " ".join(f"{k}={v}" for k, v in paper.items())
                flags = " ".join(f"--set {k}={v}" for k, v in paper.items())
                print(f"  {'':<28} paper: {values}  (reproduce with {flags})")
            note = ModelRegistry.get(name).note
            if note:
                print(f"  {'':<28} note: {note}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from anomalyzoo.demo import run_demo

    rows = run_demo(args.output_dir, args.models, overwrite=args.overwrite, img_size=args.img_size)
    print(f"\nAll outputs are under {args.output_dir}/outputs")
    return 1 if any(row.get("error") for row in rows) else 0


def command_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from anomalyzoo.predict import free_output_dir, predict_images

    output_dir = free_output_dir(Path(args.output_dir), args.overwrite)
    rows = predict_images(args.checkpoint, args.images, output_dir, device=args.device, threshold=args.threshold,
                          overwrite=True, strict=args.strict, batch_size=args.batch_size, backend=args.backend,
                          num_threads=args.num_threads, tiling=args.tiling)
    for row in rows:
        print(f"{row['score']:.4f}  {row['verdict'] or '-':<10} {row['path']}" + (f"  ({row['error']})" if row["error"] else ""))
    failed = sum(1 for row in rows if row["error"])
    print(f"Scores and anomaly maps written to {output_dir}" + (f"; {failed} image(s) could not be read" if failed else ""))
    return 1 if failed else 0


def command_export(args: argparse.Namespace) -> int:
    from anomalyzoo.deploy import export

    path = export(args.checkpoint, args.format, args.output, device=args.device)
    print(f"Exported to {path} (metadata in {path.parent / 'metadata.json'}); its scores equal the checkpoint's "
          f"within 1e-4 (checked)")
    return 0


def command_distill_teacher(args: argparse.Namespace) -> int:
    from anomalyzoo.models.efficientad import distill_teacher

    set_globals(dataset_dir=args.dataset_dir, backbone_dir=args.backbone_dir, output_dir=args.output_dir,
                seed=args.seed, num_workers=args.num_workers)
    path = distill_teacher(args.images, model_size=args.model_size, backbone=args.backbone, output_path=args.output,
                           num_steps=args.num_steps, batch_size=args.batch_size, img_size=args.img_size,
                           seed=get_settings().seed, device=args.device, overwrite=args.overwrite)
    print(f"Teacher written to {path}")
    return 0


def command_pretrain_dsr(args: argparse.Namespace) -> int:
    from anomalyzoo.models.dsr import pretrain_dsr

    set_globals(dataset_dir=args.dataset_dir, backbone_dir=args.backbone_dir, output_dir=args.output_dir,
                seed=args.seed, num_workers=args.num_workers)
    path = pretrain_dsr(args.images, output_path=args.output, num_steps=args.num_steps, batch_size=args.batch_size,
                        img_size=args.img_size, seed=get_settings().seed, device=args.device, overwrite=args.overwrite)
    print(f"DSR VQ-VAE written to {path}")
    return 0


def add_sweep_parser(commands: Any) -> None:
    sweep = commands.add_parser("sweep", help="every model on every category (and seed), resumable; here, in "
                                              "processes or on a Ray cluster")
    sweep.add_argument("--dataset", required=True, choices=["mvtec", "visa", "btad", "custom", "folder"])
    sweep.add_argument("--category", required=True, nargs="+", help="category (custom: <dataset>/<category>)")
    sweep.add_argument("--model", required=True, nargs="+", help="registry name(s); see `anomalyzoo list`")
    sweep.add_argument("--seeds", type=int, nargs="+", help="one job per seed (default: --seed, else 42)")
    sweep.add_argument("--executor", choices=["local", "process", "ray"], default="local",
                       help="local: one job after the other here; process: a pool of processes on this machine; "
                            "ray: tasks on a Ray cluster (pip install 'anomalyzoo[ray]')")
    sweep.add_argument("--ray-address", help="Ray cluster address ('auto': the running cluster; default: a local "
                                             "instance)")
    sweep.add_argument("--workers", type=int, help="process executor: jobs at a time (default: CPUs / --cpus-per-run, "
                                                   "or one per GPU share)")
    sweep.add_argument("--cpus-per-run", type=float, help="CPUs (torch threads) of each parallel job (default 1)")
    sweep.add_argument("--gpus-per-run", type=float, help="GPUs of each parallel job, e.g. 0.5 (default: 1 where "
                                                          "there are GPUs, else 0)")
    sweep.add_argument("--num-epochs", type=int)
    sweep.add_argument("--batch-size", type=int)
    sweep.add_argument("--img-size", type=int)
    sweep.add_argument("--backbone")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other training or model option, e.g. --set coreset_ratio=0.01")
    sweep.add_argument("--device")
    sweep.add_argument("--overwrite", action="store_true", help="run finished jobs again (in their folders)")
    add_global_options(sweep)


def command_sweep(args: argparse.Namespace) -> int:
    from anomalyzoo.sweep import run_sweep

    set_globals(dataset_dir=args.dataset_dir, backbone_dir=args.backbone_dir, output_dir=args.output_dir,
                seed=args.seed, num_workers=args.num_workers)
    overrides = {"num_epochs": args.num_epochs, "batch_size": args.batch_size, "img_size": args.img_size,
                 "backbone": args.backbone, "device": args.device, **parse_set_options(args.set)}
    rows = run_sweep(args.dataset, args.category, args.model, seeds=args.seeds, executor=args.executor,
                     ray_address=args.ray_address, workers=args.workers, cpus_per_run=args.cpus_per_run,
                     gpus_per_run=args.gpus_per_run, overwrite=args.overwrite,
                     **{k: v for k, v in overrides.items() if v is not None})
    failed = [row for row in rows if row.get("error")]
    if failed:
        print(f"{len(failed)} job(s) did not finish: run the same command again to retry them")
    return 1 if failed else 0


def add_summary_parser(commands: Any) -> None:
    summary = commands.add_parser("summary", help="rebuild summary.csv / summary.md from the run folders")
    summary.add_argument("output_dir", help="a sweep's folder, or any OUTPUT_DIR of train() runs")


def command_summary(args: argparse.Namespace) -> int:
    from anomalyzoo.report.runs import find_runs, summary_text, write_run_summary

    records = find_runs(args.output_dir)
    csv_path, md_path = write_run_summary(args.output_dir, records)
    print(summary_text(records))
    print(f"Summary written to {md_path} and {csv_path}")
    return 1 if any(record.status != "done" for record in records) else 0


def add_report_parser(commands: Any) -> None:
    report = commands.add_parser("report", help="one self-contained HTML page: leaderboard, histograms, hardest images")
    report.add_argument("output_dir", help="a sweep's folder, or any OUTPUT_DIR of train() runs")
    report.add_argument("--output", help="the HTML file (default OUTPUT_DIR/report.html)")
    report.add_argument("--max-examples", type=int, default=3, help="hardest images of each kind shown per run")
    report.add_argument("--open", action="store_true", help="open the page in the web browser")


def command_report(args: argparse.Namespace) -> int:
    import webbrowser

    from anomalyzoo.report.html import write_html_report

    path = write_html_report(args.output_dir, args.output, max_examples=args.max_examples)
    print(f"Report written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if args.open and not webbrowser.open(path.resolve().as_uri()):
        print(f"No web browser could be started here; open {path.resolve().as_uri()} yourself")
    return 0


SWEEP_COMMANDS = {"sweep": command_sweep, "summary": command_summary, "report": command_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return command_train(args)
        if args.command == "list":
            return command_list()
        if args.command == "demo":
            return command_demo(args)
        if args.command == "export":
            return command_export(args)
        if args.command == "distill-teacher":
            return command_distill_teacher(args)
        if args.command == "pretrain-dsr":
            return command_pretrain_dsr(args)
        if args.command in SWEEP_COMMANDS:
            return SWEEP_COMMANDS[args.command](args)
        return command_predict(args)
    except (KeyError, ValueError, OSError, TypeError, ImportError) as error:
        print(f"anomalyzoo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
