"""Worker for tests/test_feature_cache_distributed.py: build a teacher-feature cache through `cache_teacher_outputs`.

Run as a plain process (one builder) or under `accelerate launch` (2 gloo CPU processes, or one under the simple
launcher). It builds the tiny nct-crc-mini run of `conftest.make_trainer` (same seed, teacher, collator and facts),
so a trainer of that helper reuses the cache. Each rank writes `<out>/forwards-<rank>.json`: the images its
teacher saw (per view). `--slow` sleeps after each teacher batch, so that a test can interrupt the pass.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from conftest import tiny_vit
from transformers import set_seed

from moma_hf import DistillationTrainingArguments, build_distillation_model
from moma_hf.commands.teacher_cache import cache_teacher_outputs
from moma_hf.data import IMAGENET_MEAN, IMAGENET_STD, DataArguments, build_collators, label_names, load_patch_dataset
from moma_hf.networks.students import build_student

FACTS = {"teacher": "tiny", "image_size": 64}  # what tests/test_feature_cache.py's runs record too


def main():
    """Build (or continue) the cache at `--cache` on this process's share of the shards."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each teacher batch")
    options = parser.parse_args()
    torch.set_num_threads(1)

    args = DistillationTrainingArguments(
        output_dir=options.out, use_cpu=True, per_device_train_batch_size=options.batch_size, report_to="none",
        seed=0, cache_teacher_features=True, cache_views=2, cache_shard_size=options.shard_size,
        teacher_feature_cache_dir=options.cache, disable_tqdm=True, queue_size=32, projection_dim=32,
    )
    dataset = load_patch_dataset(options.data, "train", streaming=options.streaming, seed=0)
    names = label_names(dataset)
    set_seed(args.seed)  # the order of conftest.make_trainer: student, then teacher
    student, _ = build_student("test_resnet", dict(enumerate(names)), image_size=64)
    teacher = tiny_vit(names=names)
    model = build_distillation_model(student, teacher, dict(teacher.config.id2label),
                                     **args.distillation_config_kwargs())
    data_args = DataArguments(train_dir=options.data, randaugment="", stain_jitter=0.0)
    collator, _ = build_collators(data_args, 64, len(names), (IMAGENET_MEAN, IMAGENET_STD), ([0.5] * 3, [0.5] * 3))

    seen = []
    forward = model.teacher_outputs

    def counted(pixel_values):
        seen.append(len(pixel_values))
        if options.slow:
            time.sleep(options.slow)
        return forward(pixel_values)

    model.teacher_outputs = counted
    try:
        cache_teacher_outputs(model, dataset, collator, args, FACTS)
    finally:
        Path(options.out).mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        (Path(options.out) / f"forwards-{rank}.json").write_text(json.dumps(sum(seen)))
    print(f"rank {args.process_index}: cache ready", flush=True)
    if torch.distributed.is_initialized():  # leave together (see distill.main's end)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
