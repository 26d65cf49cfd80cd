"""Peak memory of a MoMA distillation step against a plain teacher forward + student training step.

Two workloads run at the same batch on the same real H&E patches (the first ``--batch_size`` files of
``nct-crc-mini``, sorted, labels from the folder names), each in its own fresh Python process so that
one's peak cannot hide in the other's:

* baseline: the teacher, in eval mode under ``torch.no_grad()``, gives its pooled features (and logits);
  then the student does forward, cross-entropy, backward and an SGD (momentum 0.9) step;
* moma: the same teacher and student wrapped in ``MoMAForDistillation`` (projection 512, 4 attention
  heads, queue 16384): forward with every loss term, backward, SGD step over the trainable parameters,
  ``momentum_update()`` and ``enqueue()``.

Two pairs of networks (``--pairs``): "frozen", a ViT-S/16-sized transformers ``ViTModel`` teacher and a timm
ResNet-18 student (``teacher_update="frozen"``), and "momentum", a ResNet-18 student whose teacher is a copy
of it (``teacher_update="momentum"``). Weights are random (nothing is downloaded); memory does not depend on them.

What is measured: on CPU the process's peak RSS (``ru_maxrss``) and its RSS once the models, optimiser and
batch are built, before the first step; on CUDA ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` at that same point. The parent prints both figures, the step's increment
(peak minus the figure before the first step) and the two ratios moma / baseline. The children run with
``MALLOC_MMAP_THRESHOLD_=131072`` (``--glibc_malloc`` drops it) so that CPU RSS follows live tensor memory
and identical runs give identical peaks; ``--queue_size`` lets one attribute the queue's share::

    python benchmarks/memory.py                       # CPU, batch 32
    python benchmarks/memory.py --device cuda --batch_size 64
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MARKER = "MEMORY_RESULT "  # prefix of the child's one result line, so library prints cannot confuse the parent


def load_batch(data_dir: Path, batch_size: int, image_size: int):
    """The first ``batch_size`` images of ``data_dir/<class>/<file>`` (sorted, cycled if too few), normalised.

    Returns ``(pixel_values (B, 3, S, S), labels (B,), id2label)``.
    """
    from torchvision.transforms import v2

    from moma_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, load_rgb_image

    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    files = sorted(f for c in classes for f in (data_dir / c).iterdir() if f.suffix.lower() in (".jpg", ".png"))
    if not files:
        raise SystemExit(f"No images under {data_dir}: pass --data_dir pointing at nct-crc-mini.")
    files = [files[i % len(files)] for i in range(batch_size)]
    transform = v2.Compose([build_eval_transform(image_size), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    pixels = torch.stack([transform(load_rgb_image(f)) for f in files])
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    return pixels, labels, dict(enumerate(classes))


def build_networks(pair: str, id2label: dict, image_size: int, vit_head: bool = False):
    """``(student, teacher, teacher_id2label)`` for the "frozen" or "momentum" pair, randomly initialised.

    With ``vit_head`` the frozen pair's ViT gets a classifier for the student's labels (so logit KD can run).
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    from moma_hf.networks.students import build_student

    student, _ = build_student("resnet18", id2label, image_size=image_size)
    if pair == "momentum":
        # The teacher is the student's architecture (a copy), with the student's labels, so logit KD is on too.
        return student, copy.deepcopy(student), dict(id2label)
    # ViT-S/16 sizes; a headless backbone, like the pathology foundation models used as frozen teachers.
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=image_size, patch_size=16, id2label=dict(id2label),
                       label2id={v: k for k, v in id2label.items()})
    if vit_head:
        return student, ViTForImageClassification(config), dict(id2label)
    return student, ViTModel(config), None


def current_memory(device: torch.device) -> int:
    """Bytes in use now: RSS on CPU (``/proc/self/status``), allocated tensor memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the peak so far, an upper bound


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the process's peak RSS on CPU (``ru_maxrss`` is KiB on Linux), the allocator's peak on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args) -> dict:
    """Build one workload, run ``--steps`` steps and return its memory figures (bytes)."""
    from moma_hf import MoMAForDistillation
    from moma_hf.networks.backbones import pooled_features

    device = torch.device(args.device)
    pixels, labels, id2label = load_batch(args.data_dir, args.batch_size, args.image_size)
    pixels, labels = pixels.to(device), labels.to(device)
    student, teacher, teacher_id2label = build_networks(args.pair, id2label, args.image_size)
    teacher.eval().requires_grad_(False)
    if args._child == "moma":
        model = MoMAForDistillation.from_student_and_teacher(
            student, teacher, teacher_id2label, projection_dim=512, num_attention_heads=4,
            queue_size=args.queue_size, global_batch_size=args.batch_size, teacher_update=args.pair,
        ).to(device)
        model.train()  # keeps the teacher in eval mode
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        student.to(device).train()
        teacher.to(device)
        params = list(student.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    gc.collect()  # drop construction garbage (feature_dim probes, config copies) before the "before" figure
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = current_memory(device)
    peaks = []
    for _ in range(args.steps):
        if args._child == "moma":
            out = model(pixel_values=pixels, labels=labels, teacher_pixel_values=pixels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.momentum_update()
            model.enqueue(out.contrastive_keys)
            del out
        else:
            with torch.no_grad():
                # What a distillation loss would keep from the teacher: pooled features and logits.
                teacher_features, teacher_logits = pooled_features(teacher, pixels)
            logits = student(pixel_values=pixels).logits
            torch.nn.functional.cross_entropy(logits, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits, teacher_features, teacher_logits
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peaks.append(peak_memory(device))
    return {"workload": args._child, "pair": args.pair, "device": str(device), "before": before,
            "peak": peaks[-1], "peak_after_each_step": peaks}


def spawn(workload: str, pair: str, args) -> dict:
    """Run one workload in a fresh interpreter and parse its result line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", workload, "--pair", pair,
               "--device", args.device, "--batch_size", str(args.batch_size), "--image_size", str(args.image_size),
               "--steps", str(args.steps), "--queue_size", str(args.queue_size), "--threads", str(args.threads),
               "--data_dir", str(args.data_dir)]
    env = dict(os.environ)
    if not args.glibc_malloc:
        # A fixed mmap threshold turns off glibc's adaptive one, so every large tensor is mmap'd and unmapped on
        # free: RSS then follows live tensor memory (as max_memory_allocated does on CUDA) instead of what the
        # allocator happens to cache. With the default, peaks moved by ~100 MiB between identical runs.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{workload}/{pair} child failed with exit code {done.returncode}")
    return json.loads(lines[-1][len(MARKER):])


def main() -> None:
    """Parse flags; as a child run one workload, as the parent run every child and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", nargs="+", choices=("frozen", "momentum"), default=["frozen", "momentum"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2, help="training steps per workload (the peak is over all)")
    parser.add_argument("--queue_size", type=int, default=16384, help="MoMA's K; lower it to attribute memory")
    parser.add_argument("--repeats", type=int, default=1, help="baseline/moma children per pair, alternated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child (one child at a time)")
    parser.add_argument("--glibc_malloc", action="store_true", help="keep glibc's adaptive mmap threshold (noisier)")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data" / "nct-crc-mini")
    parser.add_argument("--json", type=Path, help="also write the figures and ratios here")
    parser.add_argument("--_child", choices=("baseline", "moma"), help=argparse.SUPPRESS)
    parser.add_argument("--pair", choices=("frozen", "momentum"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        torch.set_num_threads(args.threads)  # children run one at a time, so each may use every core
        torch.manual_seed(0)
        print(MARKER + json.dumps(run_child(args)), flush=True)
        return

    kind = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"{kind}, device {args.device}, batch {args.batch_size}, {args.image_size} px, {args.steps} steps, "
          f"queue {args.queue_size}, {args.repeats} repeat(s), "
          f"{'glibc default malloc' if args.glibc_malloc else 'MALLOC_MMAP_THRESHOLD_=131072'}, data {args.data_dir}")
    mib = 2.0**20
    print("| pair | workload | before first step (MiB) | peak (MiB) | step increment (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    summary: dict = {"device": args.device, "batch_size": args.batch_size, "image_size": args.image_size,
                     "steps": args.steps, "queue_size": args.queue_size, "glibc_malloc": args.glibc_malloc,
                     "pairs": {}}
    for pair in args.pairs:
        runs: dict[str, list[dict]] = {"baseline": [], "moma": []}
        for _ in range(args.repeats):
            for workload in runs:  # alternate, so load on a shared machine hits both alike
                result = spawn(workload, pair, args)
                runs[workload].append(result)
                print(f"| {pair} | {workload} | {result['before'] / mib:.0f} | {result['peak'] / mib:.0f} | "
                      f"{(result['peak'] - result['before']) / mib:.0f} |", flush=True)
        # Medians over repeats; with one repeat they are the single figures.
        peak = {w: statistics.median(r["peak"] for r in rs) for w, rs in runs.items()}
        increment = {w: statistics.median(r["peak"] - r["before"] for r in rs) for w, rs in runs.items()}
        summary["pairs"][pair] = {
            "moma_vs_baseline_peak": peak["moma"] / peak["baseline"],
            "moma_vs_baseline_step_increment": increment["moma"] / increment["baseline"],
            "runs": runs,
        }
    for pair, figures in summary["pairs"].items():
        print(f"{pair}: moma_vs_baseline_peak: {figures['moma_vs_baseline_peak']:.3f}")
        print(f"{pair}: moma_vs_baseline_step_increment: {figures['moma_vs_baseline_step_increment']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
