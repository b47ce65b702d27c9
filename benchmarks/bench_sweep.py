"""What each sweep executor costs on this machine, and that they agree.

    python benchmarks/bench_sweep.py                                   # 2 x 2 synthetic jobs, 64 px
    python benchmarks/bench_sweep.py --models padim patchcore --categories 3 --img-size 128 --workers 2
    python benchmarks/bench_sweep.py --dataset-dir ../shared/data --category bottle --backbone efficientnet_lite0 \
        --img-size 256 --seeds 0 1                                     # real data: one job per seed

Runs the same sweep (synthetic categories x models, random-weight resnet18; or real categories with
``--dataset-dir``, ``--category`` and a pretrained ``--backbone``) under "local",
"process" and "ray" (a local Ray instance with ``--workers`` CPUs), each into a fresh folder, then
runs it again (every job finished: all skipped) and prints, per executor: wall time of the sweep,
the sum of the jobs' fit times (what the jobs themselves did), the re-run's time, and whether every
metric equals the local sweep's. The difference between wall time and work is the executor's
overhead (process start-up and imports, Ray's start and scheduling) minus what parallelism saves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from anomalyzoo.data.synthetic import make_synthetic_dataset
from anomalyzoo.sweep import run_sweep

COMPARED = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "dfm"])
    parser.add_argument("--categories", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--executors", nargs="+", default=["local", "process", "ray"])
    parser.add_argument("--dataset-dir", help="real MVTec-layout data (DATASET_DIR) instead of synthetic categories")
    parser.add_argument("--category", nargs="+", help="with --dataset-dir: the categories")
    parser.add_argument("--backbone", default="resnet18", help="resnet18 runs on random weights; others pretrained")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    if args.dataset_dir:
        categories, dataset_dir = list(args.category or ["bottle"]), Path(args.dataset_dir)
    else:
        categories, dataset_dir = [f"bench_{i}" for i in range(args.categories)], work / "data"
        for i, category in enumerate(categories):
            make_synthetic_dataset(dataset_dir / "mvtec", category=category, kind=("texture", "object")[i % 2],
                                   n_train=24, n_test_good=8, n_test_defect=12, image_size=max(64, args.img_size),
                                   seed=i)
    options = {"backbone": args.backbone, "pretrained": args.backbone != "resnet18", "img_size": args.img_size,
               "max_maps": 1, "dataset_dir": dataset_dir, "seeds": args.seeds}
    table, reference = [], None
    for executor in args.executors:
        extra = {"workers": args.workers} if executor == "process" else {}
        if executor == "ray":
            import ray

            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        rows = run_sweep("mvtec", categories, args.models, output_dir=work / executor, executor=executor, **extra,
                         **options)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        run_sweep("mvtec", categories, args.models, output_dir=work / executor, executor=executor, **extra, **options)
        rerun = time.perf_counter() - start
        if executor == "ray":
            ray.shutdown()
        metrics = {(row["category"], row["model"], row["seed"]): tuple(row[key] for key in COMPARED) for row in rows}
        reference = reference or metrics
        table.append((executor, len(rows), sum(1 for row in rows if row["status"] == "done"), wall,
                      sum(row["fit_seconds"] or 0.0 for row in rows), rerun, metrics == reference))
    print(f"\n{len(categories)} categories x {len(args.models)} models ({', '.join(args.models)}) x {len(args.seeds)} "
          f"seed(s), {args.backbone}, {args.img_size} px, workers {args.workers}; outputs under {work}")
    print("| executor | jobs | done | sweep wall s | sum of fit s | re-run (all skipped) s | metrics = local |")
    print("|---|---|---|---|---|---|---|")
    for executor, jobs, done, wall, fit, rerun, same in table:
        print(f"| {executor} | {jobs} | {done} | {wall:.1f} | {fit:.1f} | {rerun:.1f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
