"""What a MoMA step costs beyond the work no distillation can avoid: one teacher forward and one student step.

In one process, on one batch of real H&E patches, it times four workloads, interleaved round by round so
that drift of a shared machine hits all of them alike, and reports the median over `--steps` rounds after
`--warmup` rounds:

- (a) `student`: the student's own training step: forward, cross-entropy, backward, SGD step;
- (b) `teacher`: the teacher's forward in eval mode under `no_grad`;
- (c) `moma`: a full MoMA step through `DistillationTrainer`'s hot path: `compute_loss` (teacher, student, heads,
  batch attention, queue product, key gather, NaN guard bookkeeping), backward, the guard's all-reduce,
  SGD step, then `finish_optimizer_step` (EMA of the key pathway and enqueue);
- (d) `kd`: a Hinton KD step through the same trainer path.

Two pairs (`--pairs`), with random weights (nothing is downloaded; time does not depend on the weights):
"momentum", a timm ResNet-18 student whose teacher is a copy of it (`teacher_update="momentum"`), and
"frozen_vit", the same student under a frozen ViT-S/16-sized transformers teacher.

On CUDA the steps run under bf16 autocast with `channels_last` students, and each is timed between
`torch.cuda.synchronize()` calls. The last two lines are `overhead_ratio_momentum: <x>` and
`overhead_ratio_frozen_vit: <x>`, the ratio (c) / ((a) + (b)) for each pair::

    python benchmarks/step_overhead.py                                   # CPU: batch 32, 112 px
    python benchmarks/step_overhead.py --device cuda --batch_size 128 --image_size 224
    python benchmarks/step_overhead.py --compile --warmup 5        # and what torch.compile gains on (a), (b)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import REPO, build_networks, load_batch  # noqa: E402

PAIRS = {"momentum": "momentum", "frozen_vit": "frozen"}  # our name -> memory.build_networks' name


def distillation_trainer(method: str, student, teacher, teacher_id2label, args, output_dir: str):
    """A `DistillationTrainer` around a fresh `method` model (no data: only its step path is used) and its optimiser."""
    from moma_hf import DistillationTrainer, DistillationTrainingArguments
    from moma_hf.modeling_auto import distillation_model_class

    model = distillation_model_class(method).from_student_and_teacher(
        student, teacher, teacher_id2label, method=method, projection_dim=512, num_attention_heads=4,
        queue_size=args.queue_size, global_batch_size=args.batch_size,
    ).to(args.device)
    training_args = DistillationTrainingArguments(output_dir=output_dir, report_to="none", use_cpu=args.device == "cpu",
                                          per_device_train_batch_size=args.batch_size)
    trainer = DistillationTrainer(model=model, args=training_args)
    trainer.model.train()
    trainer.step_guard.on_train_begin(training_args, trainer.state, trainer.control)
    params = [p for p in model.parameters() if p.requires_grad]
    return trainer, torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def trainer_step(trainer, optimizer, batch: dict) -> None:
    """One optimiser step exactly as `DistillationTrainer` runs it, minus data loading and logging."""
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainer.step_guard.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer.finish_optimizer_step()


def build_workloads(pair: str, pixels, labels, id2label, args, tmp: str) -> dict:
    """The four step functions of one pair, each a closure over its own networks and optimiser."""
    student, teacher, teacher_id2label = build_networks(PAIRS[pair], id2label, args.image_size, vit_head=True)
    teacher.eval().requires_grad_(False)
    memory_format = torch.channels_last if args.device == "cuda" else torch.contiguous_format
    plain_student = copy.deepcopy(student).to(args.device, memory_format=memory_format).train()
    plain_teacher = copy.deepcopy(teacher).to(args.device)
    optimizer = torch.optim.SGD(plain_student.parameters(), lr=1e-3, momentum=0.9)
    batch = {"pixel_values": pixels, "labels": labels, "teacher_pixel_values": pixels}

    def student_step(network=plain_student, optimizer=optimizer):
        loss = F.cross_entropy(network(pixel_values=pixels).logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_forward(network=plain_teacher):
        with torch.no_grad():
            network(pixel_values=pixels)

    steps = {"student": student_step, "teacher": teacher_forward}
    if args.compile:  # compiled copies, timed in the same rounds as the eager ones
        compiled_student, compiled_teacher = copy.deepcopy(plain_student), copy.deepcopy(plain_teacher)
        compiled_student.compile()
        compiled_teacher.compile()
        compiled_optimizer = torch.optim.SGD(compiled_student.parameters(), lr=1e-3, momentum=0.9)
        steps["student_compiled"] = lambda: student_step(compiled_student, compiled_optimizer)
        steps["teacher_compiled"] = lambda: teacher_forward(compiled_teacher)
    for method in ("moma", "kd"):
        trainer, method_optimizer = distillation_trainer(
            method, copy.deepcopy(student).to(memory_format=memory_format), copy.deepcopy(teacher),
            teacher_id2label, args, f"{tmp}/{pair}-{method}")
        steps[method] = lambda t=trainer, o=method_optimizer: trainer_step(t, o, batch)
    return steps


def time_rounds(steps: dict, args) -> dict[str, float]:
    """Median seconds of each step function, over `args.steps` interleaved rounds after `args.warmup`."""
    cuda = args.device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    times = {name: [] for name in steps}
    for round_index in range(args.warmup + args.steps):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                step()
            if cuda:
                torch.cuda.synchronize()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> dict[str, float]:
    """Time every pair and print the table, then the two ratio lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", nargs="+", choices=tuple(PAIRS), default=list(PAIRS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--queue_size", type=int, default=16384)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd copies of the student step "
                        "and the teacher forward; raise --warmup to keep compilation out of the timings")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data" / "nct-crc-mini")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pixels, labels, id2label = load_batch(args.data_dir, args.batch_size, args.image_size)
    pixels, labels = pixels.to(args.device), labels.to(args.device)
    if args.device == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), batch {args.batch_size}, {args.image_size} px, median of "
          f"{args.steps} rounds after {args.warmup}, queue {args.queue_size}, torch {torch.__version__}"
          + (", torch.compile" if args.compile else ""))
    print("| pair | (a) student step | (b) teacher forward | (c) MoMA step | (d) KD step | (c)/((a)+(b)) "
          "| (d)/((a)+(b)) |\n| --- | --- | --- | --- | --- | --- | --- |")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            median = time_rounds(build_workloads(pair, pixels, labels, id2label, args, tmp), args)
            floor = median["student"] + median["teacher"]
            ratios[pair] = median["moma"] / floor
            print(f"| {pair} | " + " | ".join(f"{1000 * median[k]:.1f} ms" for k in ("student", "teacher", "moma", "kd"))
                  + f" | {ratios[pair]:.3f} | {median['kd'] / floor:.3f} |", flush=True)
            if args.compile:
                print(f"{pair}: torch.compile speed-up, student step {median['student'] / median['student_compiled']:.3f}"
                      f", teacher forward {median['teacher'] / median['teacher_compiled']:.3f}", flush=True)
    for pair, ratio in ratios.items():
        print(f"overhead_ratio_{pair}: {ratio:.3f}")
    return ratios


if __name__ == "__main__":
    main()
