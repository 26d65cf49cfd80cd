"""What the teacher-feature cache buys: epoch time without the teacher forward, and the accuracy it costs.

1. Speed. The `moma-distill` job (`moma_hf.commands.distill.main`) distils a ResNet-18 student from a frozen
   ViT-L/16-sized teacher (UNI's size; `--teacher vit-base` for Phikon's ViT-B/16) with random weights, since
   nothing can be downloaded and time does not depend on the weights. It runs at 224 px on `--images` real
   crc-polyp-96 patches for `--epochs` epochs, once as usual and once with `--cache_teacher_features`. The ratio
   of the two `train_runtime`s is the per-epoch speed-up after the caching pass; the pass itself is reported
   beside it (`build_seconds` in the cache's `cache_info.json`).
2. Accuracy. The same-task scenario of `moma-compare` (ResNet-18 teacher, ResNet-10t student, 10% of
   the labels, 80 steps, the scenario's seeds or `--seeds`) runs MoMA with and without the cache
   (`--cache_views` views), paired, reusing the harness's teacher, subsets and finished runs.

The last two lines are `cache_speedup: <x>` and `cache_macro_f1_delta: <points>` (cached minus uncached, mean
over seeds, with its 95% interval printed above)::

    python benchmarks/feature_cache.py                                   # ViT-L teacher, scenario seeds
    python benchmarks/feature_cache.py --teacher vit-base --skip_accuracy
    python benchmarks/feature_cache.py --skip_speed --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from moma_hf.commands import compare as cm
from moma_hf.commands import distill

REPO = Path(__file__).resolve().parents[1]

SAME_TASK = REPO / "examples" / "configs" / "scenario_same_task.yaml"


VIT_SIZES = {  # (hidden, layers, heads, MLP) of the foundation models' backbones
    "vit-base": (768, 12, 12, 3072),  # Phikon
    "vit-large": (1024, 24, 16, 4096),  # UNI
}


def vit_teacher(path: Path, size: str, image_size: int) -> str:
    """Save a randomly initialised ViT backbone of `size` (safetensors) at `path`; its path."""
    from transformers import ViTConfig, ViTModel

    hidden, layers, heads, mlp = VIT_SIZES[size]
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=mlp, image_size=image_size, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def measure_speed(args, work: Path) -> dict[str, float]:
    """`train_runtime` of the uncached and cached runs and the caching pass's seconds."""
    pool = cm.list_images(args.data_dir / "train")
    files, _ = cm.stratified_split(pool, args.images / sum(map(len, pool.values())), seed=0)
    train_dir = cm.link_subset(files, work / "images")
    teacher = vit_teacher(work / "teacher", args.teacher, args.image_size)
    common = {"train_dir": train_dir, "teacher_model_name_or_path": teacher, "student_model_name_or_path": "resnet18",
              "image_size": args.image_size, "num_train_epochs": args.epochs, "per_device_train_batch_size": 32,
              "dataloader_num_workers": 2, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
              "logging_steps": 1000, "learning_rate": 0.01, "optim": "sgd", "queue_size": 1024, "projection_dim": 128}
    runtimes = {}
    for name, extra in (("uncached", {}), ("cached", {"cache_teacher_features": True, "cache_views": args.epochs})):
        out = work / name
        code = distill.main([f"--{k}={v}" for k, v in {**common, **extra, "output_dir": out}.items()])
        if code:
            raise RuntimeError(f"the {name} run stopped with exit code {code}")
        runtimes[name] = json.loads((out / "train_results.json").read_text())["train_runtime"]
    info = json.loads((work / "cached" / "_teacher-feature-cache" / "cache_info.json").read_text())
    return {**runtimes, "build_seconds": info["build_seconds"], "images": info["num_rows"]}


def measure_accuracy(args) -> list[tuple[int, float, float]]:
    """`(seed, uncached macro-F1, cached macro-F1)` on the same-task scenario."""
    config = yaml.safe_load(SAME_TASK.read_text())
    out = REPO / "outputs" / "compare" / SAME_TASK.stem
    teacher, test_dir, pool = cm.prepare_scenario(config, out)
    cached = f"moma --cache_teacher_features true --cache_views {args.cache_views}"
    rows = []
    for seed in args.seeds or config["seeds"]:
        train_dir = cm.labeled_subset(pool, config, seed, out)
        scores = [cm.run_method(variant, seed, train_dir, test_dir, teacher, config,
                                out / f"seed{seed}" / cm.variant_dir(variant))["macro_f1"]
                  for variant in ("moma", cached)]
        rows.append((seed, *scores))
    return rows


def main(argv=None) -> tuple[float, float]:
    """Run both measurements; print the tables and the two result lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="training images for the speed measurement")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the speed runs (= the cache's views)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--teacher", choices=tuple(VIT_SIZES), default="vit-large", help="the speed runs' teacher")
    parser.add_argument("--cache_views", type=int, default=4, help="views of the accuracy runs' caches")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data" / "crc-polyp-96")
    parser.add_argument("--seeds", nargs="+", type=int, help="accuracy seeds (default: the scenario's)")
    parser.add_argument("--skip_speed", action="store_true")
    parser.add_argument("--skip_accuracy", action="store_true")
    args = parser.parse_args(argv)
    speedup = float("nan")
    if not args.skip_speed:
        with tempfile.TemporaryDirectory() as tmp:
            speed = measure_speed(args, Path(tmp))
        speedup = speed["uncached"] / speed["cached"]
        print(f"{args.teacher}/16 teacher (frozen) -> ResNet-18 student, {args.image_size} px, {speed['images']} "
              f"images, {args.epochs} epochs of batch 32\n| run | train_runtime | per epoch |\n| --- | --- | --- |")
        for name in ("uncached", "cached"):
            print(f"| {name} | {speed[name]:.1f} s | {speed[name] / args.epochs:.1f} s |")
        print(f"caching pass ({args.epochs} views): {speed['build_seconds']:.1f} s")
    delta = float("nan")
    if not args.skip_accuracy:
        rows = measure_accuracy(args)
        print(f"\nsame-task scenario, MoMA, {args.cache_views} cached views\n| seed | uncached macro-F1 | cached "
              "macro-F1 | difference |\n| --- | --- | --- | --- |")
        for seed, plain, cached in rows:
            print(f"| {seed} | {100 * plain:.1f} | {100 * cached:.1f} | {100 * (cached - plain):+.1f} |")
        differences = np.array([100 * (cached - plain) for _, plain, cached in rows])
        delta = float(differences.mean())
        if len(differences) > 1:
            half = cm.t_quantile(len(differences) - 1) * differences.std(ddof=1) / np.sqrt(len(differences))
            print(f"mean difference {delta:+.2f} points, 95% CI [{delta - half:+.2f}, {delta + half:+.2f}]")
    print(f"cache_speedup: {speedup:.2f}")
    print(f"cache_macro_f1_delta: {delta:+.2f}")
    return speedup, delta


if __name__ == "__main__":
    main()
