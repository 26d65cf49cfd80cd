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

3. The caching pass (`--build_teacher` ViT, default ViT-B-sized, over `--build_images` patches, 2 views): its
   throughput in 2 gloo processes against 1 (`accelerate launch`, one torch thread each, the same shards), and
   float16/bfloat16 storage against float32 (relative feature error per image and view, disk size), beside the
   error of a bfloat16 teacher (`--teacher_dtype bfloat16`) against the float32 one. With
   `--accuracy_cache_dtype float16`, part 2 pairs a float16 cache against a float32 one instead (the macro-F1
   change of storage precision; `cache_macro_f1_delta` is then float16 minus float32).

The result lines are `cache_speedup: <x>`, `cache_macro_f1_delta: <points>` (cached minus uncached, mean over
seeds, with its 95% interval printed above), `cache_build_scaling: <ratio>` and the storage errors::

    python benchmarks/feature_cache.py                                   # ViT-L teacher, scenario seeds
    python benchmarks/feature_cache.py --teacher vit-base --skip_accuracy
    python benchmarks/feature_cache.py --skip_speed --seeds 0 1 2 3 4 5
    python benchmarks/feature_cache.py --skip_speed --skip_accuracy --skip_storage   # cache_build_scaling
    python benchmarks/feature_cache.py --skip_speed --skip_accuracy --skip_scaling   # storage precision
    python benchmarks/feature_cache.py --skip_speed --skip_scaling --skip_storage --accuracy_cache_dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from moma_hf.commands import compare as cm
from moma_hf.commands import distill
from moma_hf.data import TeacherFeatureCache

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


def build_setup(args, work: Path) -> dict[str, object]:
    """The caching-pass runs' shared `moma-distill` flags: `--build_images` patches, a `--build_teacher` ViT."""
    pool = cm.list_images(args.data_dir / "train")
    files, _ = cm.stratified_split(pool, args.build_images / sum(map(len, pool.values())), seed=0)
    teacher = vit_teacher(work / "teacher", args.build_teacher, args.image_size)
    return {"train_dir": cm.link_subset(files, work / "images"), "teacher_model_name_or_path": teacher,
            "student_model_name_or_path": "resnet18", "image_size": args.image_size, "max_steps": 1,
            "per_device_train_batch_size": 16, "cache_teacher_features": True, "cache_views": 2,
            "cache_shard_size": max(1, args.build_images // 8), "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "queue_size": 64, "projection_dim": 128, "dataloader_num_workers": 0}


def cache_info(cache: Path) -> dict:
    """A built cache's `cache_info.json`."""
    return json.loads((cache / "cache_info.json").read_text())


def measure_build_scaling(args, work: Path) -> dict[str, float]:
    """Images x views per second of the caching pass in 1 and in 2 gloo processes, one torch thread each.

    Each pass is a real `moma-distill` (then one training step): alone, and under `accelerate launch`.
    """
    common = build_setup(args, work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    rates = {}
    for processes, prefix in ((1, [sys.executable]), (2, launcher)):
        out = work / f"scaling-{processes}"
        flags = [f"--{k}={v}" for k, v in {**common, "output_dir": out, "use_cpu": True}.items()]
        subprocess.run([*prefix, "-m", "moma_hf.commands.distill", *flags], env=env, check=True)
        info = cache_info(out / "_teacher-feature-cache")
        rates[processes] = info["num_rows"] * info["views"] / info["build_seconds"]
    return rates


def measure_storage(args, work: Path) -> dict[str, dict[str, float]]:
    """Per (image, view) relative feature error `|f - f32| / |f32|` (max, mean) against the float32 cache, and disk
    size against it: float16 and bfloat16 storage, and a bfloat16 teacher (`--teacher_dtype`) stored in float32."""
    common = build_setup(args, work)
    variants = {"float32": {}, "float16": {"cache_dtype": "float16"}, "bfloat16": {"cache_dtype": "bfloat16"},
                "bf16 teacher": {"teacher_dtype": "bfloat16"}}
    caches = {}
    for name, extra in variants.items():
        out = work / f"storage-{name.replace(' ', '-')}"
        code = distill.main([f"--{k}={v}" for k, v in {**common, **extra, "output_dir": out}.items()])
        if code:
            raise RuntimeError(f"the {name} run stopped with exit code {code}")
        caches[name] = TeacherFeatureCache(out / "_teacher-feature-cache")
    exact = caches["float32"].outputs()
    sizes = {name: sum(f.stat().st_size for f in cache.path.glob("shard-*.arrow")) for name, cache in caches.items()}
    results = {}
    for name, cache in caches.items():
        error = (cache.outputs() - exact).norm(dim=-1) / exact.norm(dim=-1)
        results[name] = {"max": error.max().item(), "mean": error.mean().item(),
                         "disk": sizes[name] / sizes["float32"]}
    return results


def report_build(args, work: Path) -> tuple[float, dict]:
    """Run and print the caching pass's scaling and the storage comparison; `(scaling ratio, storage results)`."""
    scaling, storage = float("nan"), {}
    what = f"{args.build_teacher}/16 teacher, {args.image_size} px, {args.build_images} images x 2 views"
    if not args.skip_scaling:
        rates = measure_build_scaling(args, work / "scaling")
        scaling = rates[2] / rates[1]
        print(f"\ncaching pass, {what}, one torch thread per process\n| processes | images x views / s |\n"
              f"| --- | --- |\n| 1 | {rates[1]:.2f} |\n| 2 | {rates[2]:.2f} |")
    if not args.skip_storage:
        storage = measure_storage(args, work / "storage")
        print(f"\nstorage precision, {what}: relative feature error against float32 storage of a float32 teacher\n"
              "| cache | max | mean | disk vs float32 |\n| --- | --- | --- | --- |")
        for name, row in storage.items():
            print(f"| {name} | {row['max']:.2e} | {row['mean']:.2e} | {row['disk']:.3f} |")
    return scaling, storage


def measure_accuracy(args) -> list[tuple[int, float, float]]:
    """`(seed, uncached macro-F1, cached macro-F1)` on the same-task scenario; with `--accuracy_cache_dtype`,
    `(seed, float32-cache macro-F1, that dtype's cache macro-F1)`."""
    config = yaml.safe_load(SAME_TASK.read_text())
    out = REPO / "outputs" / "compare" / SAME_TASK.stem
    teacher, test_dir, pool = cm.prepare_scenario(config, out)
    cached = f"moma --cache_teacher_features true --cache_views {args.cache_views}"
    pair = ("moma", cached)
    if args.accuracy_cache_dtype:
        pair = (cached, f"{cached} --cache_dtype {args.accuracy_cache_dtype}")
    rows = []
    for seed in args.seeds or config["seeds"]:
        train_dir = cm.labeled_subset(pool, config, seed, out)
        scores = [cm.run_method(variant, seed, train_dir, test_dir, teacher, config,
                                out / f"seed{seed}" / cm.variant_dir(variant))["macro_f1"]
                  for variant in pair]
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
    parser.add_argument("--accuracy_cache_dtype", choices=("float16", "bfloat16"),
                        help="compare a cache stored in this dtype against a float32 one (instead of no cache)")
    parser.add_argument("--build_images", type=int, default=256, help="images of the caching-pass measurements")
    parser.add_argument("--build_teacher", choices=tuple(VIT_SIZES), default="vit-base",
                        help="the caching-pass measurements' teacher")
    parser.add_argument("--skip_scaling", action="store_true", help="skip the 1-vs-2-process caching pass")
    parser.add_argument("--skip_storage", action="store_true", help="skip the float16/bfloat16 storage comparison")
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
        first, second = ("float32 cache", f"{args.accuracy_cache_dtype} cache") if args.accuracy_cache_dtype else (
            "uncached", "cached")
        print(f"\nsame-task scenario, MoMA, {args.cache_views} cached views\n| seed | {first} macro-F1 | {second} "
              "macro-F1 | difference |\n| --- | --- | --- | --- |")
        for seed, plain, cached in rows:
            print(f"| {seed} | {100 * plain:.1f} | {100 * cached:.1f} | {100 * (cached - plain):+.1f} |")
        differences = np.array([100 * (cached - plain) for _, plain, cached in rows])
        delta = float(differences.mean())
        if len(differences) > 1:
            half = cm.t_quantile(len(differences) - 1) * differences.std(ddof=1) / np.sqrt(len(differences))
            print(f"mean difference {delta:+.2f} points, 95% CI [{delta - half:+.2f}, {delta + half:+.2f}]")
    with tempfile.TemporaryDirectory() as tmp:
        scaling, storage = report_build(args, Path(tmp))
    # Only what this invocation measured (the --skip_* flags leave the rest out).
    if not args.skip_speed:
        print(f"cache_speedup: {speedup:.2f}")
    if not args.skip_accuracy:
        compared = f"{args.accuracy_cache_dtype}_" if args.accuracy_cache_dtype else ""
        print(f"cache_{compared}macro_f1_delta: {delta:+.2f}")
    if not args.skip_scaling:
        print(f"cache_build_scaling: {scaling:.2f}")
    for name in ("float16", "bfloat16", "bf16 teacher"):
        if name in storage:
            print(f"cache_{name.replace(' ', '_')}_max_relative_error: {storage[name]['max']:.2e}")
    return speedup, delta


if __name__ == "__main__":
    main()
