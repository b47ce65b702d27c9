"""Fit time, inference time, peak memory and accuracy per model on one MVTec category.

    python benchmarks/bench_models.py --dataset-dir ../shared/data --models patchcore padim
    python benchmarks/bench_models.py --dataset-dir ../shared/data --models stfpm fre --set num_epochs=5
    python benchmarks/bench_models.py --models stfpm efficientad-small --set stfpm.num_epochs=3

``--set KEY=VALUE`` applies to every model, ``--set MODEL.KEY=VALUE`` to one.

Each model runs in its own process so that the peak memory reported is that model's alone.
Prints a Markdown table (and writes it with a CSV next to the runs' outputs).
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path
from typing import Any

COLUMNS = ["model", "backbone", "img_size", "num_epochs", "image_auroc", "pixel_auroc", "pixel_aupro",
           "fit_seconds", "fit_seconds_per_epoch", "inference_ms_per_image", "peak_memory_mb", "gpu_peak_memory_mb", "device"]


def run_one(queue: mp.Queue, model: str, args: dict[str, Any]) -> None:
    from anomalyzoo import ModelRegistry, train

    try:
        overrides = {key: value for key, value in args["overrides"].items() if "." not in key}
        overrides.update({key.split(".", 1)[1]: value for key, value in args["overrides"].items() if key.startswith(model + ".")})
        if "backbone" in ModelRegistry.get_model_config(model):  # efficientad has no backbone option
            overrides.setdefault("backbone", args["backbone"])
        result = train(args["dataset"], args["category"], model, dataset_dir=args["dataset_dir"],
                       output_dir=args["output_dir"], max_maps=1, **overrides)
        result["fit_seconds_per_epoch"] = result["fit_seconds"] / max(result["num_epochs"], 1)
        result["backbone"] = result["model_config"].get("backbone", "-")
        result["img_size"] = result["train_config"]["img_size"]
        queue.put(result)
    except Exception as error:  # report and go on with the next model
        queue.put({"model": model, "error": f"{type(error).__name__}: {error}"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", default="../shared/data")
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    options = parser.parse_args()

    overrides = {}
    for item in options.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    output_dir = options.output_dir or tempfile.mkdtemp(prefix="anomalyzoo_bench_")
    args = {"dataset": options.dataset, "category": options.category, "dataset_dir": options.dataset_dir,
            "output_dir": output_dir, "backbone": options.backbone, "overrides": overrides}
    context = mp.get_context("spawn")
    rows = []
    for model in options.models:
        queue = context.Queue()
        process = context.Process(target=run_one, args=(queue, model, args))
        process.start()
        rows.append(queue.get())
        process.join()
    from anomalyzoo.report import format_markdown_table, write_summary_tables

    columns = COLUMNS + (["error"] if any("error" in row for row in rows) else [])
    print(f"\n{options.dataset}/{options.category}, backbone {options.backbone}\n")
    print(format_markdown_table(rows, columns))
    write_summary_tables(rows, Path(output_dir) / "benchmark.csv", Path(output_dir) / "benchmark.md", columns)
    print(f"\n(outputs and benchmark.md/csv in {output_dir})")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
