"""Peak memory of cached training: no teacher in memory, so about what a student-only run needs.

Three `moma-distill` runs (`moma_hf.commands.distill.main`), each alone in a fresh subprocess, with the same
data, student (a random ResNet-18), image size, batch and steps:

(a) `cached`: MoMA with a frozen teacher whose outputs come from a teacher-feature cache built beforehand (by
    a separate run, not measured), so the teacher's weights are never read;
(b) `teacher_loaded`: the same MoMA run without the cache: the teacher is loaded and runs every step;
(c) `student_only`: `--method ce`, which loads no teacher.

The teacher is a randomly initialised ViT of `--teacher` size (ViT-L/16, UNI's size, by default: 300 M
parameters, 1.2 GB in float32) saved to a temporary folder, since nothing can be downloaded. Peak memory is
the process's peak resident set size (`ru_maxrss`; data loading runs in the process, `--dataloader_num_workers
0`), or with `--device cuda` `torch.cuda.max_memory_allocated`. The last two lines are::

    cached_memory_vs_student_only: <a / c>
    teacher_loaded_vs_student_only: <b / c>

    python benchmarks/cached_memory.py                                  # ViT-L teacher, CPU
    python benchmarks/cached_memory.py --device cuda --batch_size 64
    python benchmarks/cached_memory.py --teacher vit-small --images 32 --steps 2 --image_size 64   # a quick try

`--per_process N` asks instead whether N processes of one node that load the same teacher (as every rank of a run
does) hold its weights once or N times (CPU, Linux): each loads it with `load_teacher`, reads every weight, and
reports from `/proc/self/smaps` the pages it maps from `model.safetensors` (`Pss` counts a shared page once over
its sharers; `Private_Dirty` pages are the process's own copy), and times `weights_sha256`. The last lines::

    teacher_pss_over_weights: <largest Pss / weight bytes>    (1.0: a copy per process; 1/N: one shared copy)
    weights_sha256_seconds_per_gb: <seconds>

    python benchmarks/cached_memory.py --per_process 2 --teacher vit-base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moma_hf.commands import compare

REPO = Path(__file__).resolve().parents[1]

VIT_SIZES = {  # (hidden, layers, heads, MLP)
    "vit-small": (384, 12, 6, 1536),
    "vit-base": (768, 12, 12, 3072),  # Phikon
    "vit-large": (1024, 24, 16, 4096),  # UNI
}

# Run in the subprocess: the distill job, then its peak memory as one JSON line.
_MEASURE = """
import json, resource, sys, torch
from moma_hf.commands.distill import main
code = main(sys.argv[1:])
on_cpu = "--use_cpu=true" in sys.argv
peak = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if on_cpu else torch.cuda.max_memory_allocated()
print("PEAK_MEMORY " + json.dumps({"code": code, "bytes": peak}))
"""


def save_vit_teacher(path: Path, size: str, image_size: int) -> str:
    """A randomly initialised ViT backbone of `size` saved (safetensors) at `path`; returns the path."""
    from transformers import ViTConfig, ViTModel

    hidden, layers, heads, mlp = VIT_SIZES[size]
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=mlp, image_size=image_size, patch_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)


def peak_memory(flags: dict, device: str) -> int:
    """Peak memory in bytes of one `moma-distill` run with `flags`, alone in a new Python process."""
    argv = [f"--{name}={value}" for name, value in flags.items()] + (["--use_cpu=true"] if device == "cpu" else [])
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_MEMORY ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the run {argv} failed:\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1].removeprefix("PEAK_MEMORY "))
    if result["code"]:
        raise RuntimeError(f"the run {argv} stopped with exit code {result['code']}:\n{done.stderr[-4000:]}")
    return result["bytes"]


def measure(args, work: Path) -> dict[str, int]:
    """Peak bytes of the `cached`, `teacher_loaded` and `student_only` runs (the cache is built first)."""
    pool = compare.list_images(args.data_dir / "train")
    files, _ = compare.stratified_split(pool, args.images / sum(map(len, pool.values())), seed=0)
    common = {"train_dir": compare.link_subset(files, work / "images"), "student_model_name_or_path": "resnet18",
              "image_size": args.image_size, "max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
              "dataloader_num_workers": 0, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
              "logging_steps": 1000, "optim": "sgd", "learning_rate": 0.01, "queue_size": 1024,
              "projection_dim": 128, "seed": 0}
    teacher = {"teacher_model_name_or_path": save_vit_teacher(work / "teacher", args.teacher, args.image_size),
               "teacher_update": "frozen"}
    cache = {"cache_teacher_features": True, "cache_views": 1, "teacher_feature_cache_dir": work / "cache"}
    peak_memory({**common, **teacher, **cache, "output_dir": work / "build"}, args.device)  # builds the cache
    runs = {"cached": {**teacher, **cache}, "teacher_loaded": teacher, "student_only": {"method": "ce"}}
    return {name: peak_memory({**common, **extra, "output_dir": work / name}, args.device)
            for name, extra in runs.items()}

# Run in each --per_process subprocess: load the teacher, read it, hash it, then report its mapped pages.
_PAGES = """
import json, sys, time
from moma_hf.networks.teachers import load_teacher, weights_sha256
teacher = load_teacher(sys.argv[1])
for parameter in teacher.model.parameters():
    parameter.data.sum()
start = time.perf_counter()
weights_sha256(teacher.model)
seconds = time.perf_counter() - start
time.sleep(float(sys.argv[2]))  # until every process has loaded: shared pages are counted over all of them
pages, inside = {}, False
with open("/proc/self/smaps") as smaps:
    for line in smaps:
        field = line.split()[0]
        if not field.endswith(":"):  # a mapping's header: its address range, then the file it maps
            inside = line.rstrip().endswith("model.safetensors")
        elif inside and field[:-1] in ("Rss", "Pss", "Private_Dirty"):
            pages[field[:-1]] = pages.get(field[:-1], 0) + 1024 * int(line.split()[1])
weights = sum(p.numel() * p.element_size() for p in teacher.model.parameters())
print("TEACHER_PAGES " + json.dumps({"weights": weights, "seconds": seconds, **pages}), flush=True)
"""


def measure_per_process(args, work: Path) -> dict[str, float]:
    """`--per_process N`: N processes load one teacher at once; print each one's mapped pages and the figures."""
    path = save_vit_teacher(work / "teacher", args.teacher, 224)
    children = [subprocess.Popen([sys.executable, "-c", _PAGES, path, "20"], stdout=subprocess.PIPE, text=True)
                for _ in range(args.per_process)]
    lines = [line for child in children for line in child.communicate()[0].splitlines()]
    results = [json.loads(line.removeprefix("TEACHER_PAGES ")) for line in lines if line.startswith("TEACHER_PAGES ")]
    if len(results) != args.per_process:
        raise RuntimeError("a process failed to load the teacher: see its output above")
    mib = 2**20
    print(f"{args.per_process} processes loading one {args.teacher}/16 teacher ({results[0]['weights'] / mib:.0f} MiB "
          "of weights)\n| process | Rss | Pss | Private_Dirty | sha256 |\n| --- | --- | --- | --- | --- |")
    for index, r in enumerate(results):
        print(f"| {index} | {r.get('Rss', 0) / mib:.0f} MiB | {r.get('Pss', 0) / mib:.0f} MiB | "
              f"{r.get('Private_Dirty', 0) / mib:.0f} MiB | {r['seconds']:.2f} s |")
    figures = {"teacher_pss_over_weights": max(r.get("Pss", 0) for r in results) / results[0]["weights"],
               "weights_sha256_seconds_per_gb": max(r["seconds"] / (r["weights"] / 1e9) for r in results)}
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")
    return figures


def main(argv=None) -> tuple[float, float]:
    """Measure the three runs; print a table and the two ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=tuple(VIT_SIZES), default="vit-large")
    parser.add_argument("--images", type=int, default=64, help="training images (the cache holds one view each)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data" / "crc-polyp-96")
    parser.add_argument("--per_process", type=int, help="instead: N processes load the teacher (see the docstring)")
    args = parser.parse_args(argv)
    if args.per_process:
        with tempfile.TemporaryDirectory() as tmp:
            return tuple(measure_per_process(args, Path(tmp)).values())
    with tempfile.TemporaryDirectory() as tmp:
        peaks = measure(args, Path(tmp))
    what = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"{args.teacher}/16 teacher (frozen, random) -> ResNet-18 student, {args.image_size} px, batch "
          f"{args.batch_size}, {args.steps} steps, {args.device}\n| run | {what} |\n| --- | --- |")
    for name, peak in peaks.items():
        print(f"| {name} | {peak / 2**20:.0f} MiB |")
    cached, loaded = peaks["cached"] / peaks["student_only"], peaks["teacher_loaded"] / peaks["student_only"]
    print(f"cached_memory_vs_student_only: {cached:.3f}")
    print(f"teacher_loaded_vs_student_only: {loaded:.3f}")
    return cached, loaded


if __name__ == "__main__":
    main()
