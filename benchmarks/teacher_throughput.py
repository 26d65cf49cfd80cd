"""How fast each foundation-model preset embeds patches: what a user needs to plan a caching pass or a run.

Each preset's published architecture is built with random weights at its real size (nothing is downloaded;
speed does not depend on the weights) and embeds batches of real H&E patches (the demo patches, resized to the
preset's input size and normalized with its statistics) through `pooled_features`, the path distillation
uses, embedding recipe included. Presets are timed in turn, `--rounds` times each, so that a slow phase of a
shared machine falls on all of them; the first `--warmup` batches of a round are dropped.

Printed per preset: images/s (median over rounds, and min-max), the ratio to the first preset's images/s in the
same run, and on CUDA the peak memory (`torch.cuda.max_memory_allocated`) of the forward::

    python benchmarks/teacher_throughput.py                         # CPU: phikon and h0-mini (the ViT-B presets)
    python benchmarks/teacher_throughput.py --device cuda --dtype bfloat16 \\
        --presets phikon uni uni2-h virchow2 h-optimus-0 --batches 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModel

from moma_hf.data import build_eval_transform, load_rgb_image
from moma_hf.networks.backbones import pooled_features
from moma_hf.networks.preset_registry import PRESETS
from moma_hf.networks.teacher_presets import instantiate

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_data"


def patch_batch(preset, batch_size: int) -> torch.Tensor:
    """`(batch_size, 3, S, S)` real patches (cycled) at the preset's input size and normalization."""
    files = sorted(DEMO.glob("*/*/*.jpg"))
    transform = build_eval_transform(preset.input_size)
    images = torch.stack([transform(load_rgb_image(files[i % len(files)])) for i in range(batch_size)])
    return (images - torch.tensor(preset.mean).view(3, 1, 1)) / torch.tensor(preset.std).view(3, 1, 1)


def build(preset, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The published architecture with random weights, on `device` in `dtype`, eval mode."""
    with torch.device(device):
        model = instantiate(AutoModel.from_config, preset.published_config(), **preset.init_kwargs)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    return model.to(memory_format=torch.channels_last) if device.startswith("cuda") else model


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_round(model, images: torch.Tensor, warmup: int, batches: int, device: str) -> float:
    """Images per second over `batches` timed forwards after `warmup` untimed ones."""
    for _ in range(warmup):
        pooled_features(model, images)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        pooled_features(model, images)
    sync(device)
    return batches * images.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Time every requested preset and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["phikon", "h0-mini"], choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    models, inputs, peaks = {}, {}, {}
    for name in args.presets:
        preset = PRESETS[name]
        models[name] = build(preset, args.device, dtype)
        inputs[name] = patch_batch(preset, args.batch_size).to(args.device, dtype)
    rates = {name: [] for name in args.presets}
    for _ in range(args.rounds):
        for name in args.presets:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            rates[name].append(time_round(models[name], inputs[name], args.warmup, args.batches, args.device))
            if args.device.startswith("cuda"):
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    reference = statistics.median(rates[args.presets[0]])
    print(f"device {args.device}, {args.dtype}, batch {args.batch_size}, {args.rounds} rounds of {args.batches}")
    for name in args.presets:
        median = statistics.median(rates[name])
        memory = f", peak {peaks[name]:.1f} GiB" if name in peaks else ""
        print(f"{name}: {median:.1f} images/s (min {min(rates[name]):.1f}, max {max(rates[name]):.1f}), "
              f"{median / reference:.3f} x {args.presets[0]}{memory}")


if __name__ == "__main__":
    main()
