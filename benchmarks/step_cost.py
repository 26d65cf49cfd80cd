"""What a distillation step costs beyond the work no distillation can avoid: time (`time`), the time of each of
MoMA's own pieces (`parts`), or peak memory (`memory`).

Every workload is a real `Trainer.train()` of a few steps on one batch of real H&E patches (the first
`--batch_size` files of nct-crc-mini, sorted, labels from the folder names), so what is measured is the step the
package runs, not a copy of it:

- `baseline`: the work any distillation needs, through a plain `transformers.Trainer`: the teacher's forward (eval
  mode, `no_grad`), then the student's forward, cross-entropy, backward and optimiser step;
- `moma`: a MoMA step through `DistillationTrainer` (teacher, student, heads, batch attention, queue product, key
  gather, NaN guard, optimiser step, EMA of the key pathway and enqueue);
- `kd`: a Hinton KD step through `DistillationTrainer`.

All use SGD (momentum 0.9) and a constant learning rate. Two pairs (`--pairs`), with random weights (nothing is
downloaded; time and memory do not depend on the weights): "momentum", a timm ResNet-18 student whose teacher is a
copy of it (`teacher_update="momentum"`), and "frozen_vit", the same student under a frozen ViT-S/16-sized
transformers teacher with a head for the student's labels.

`time`: in one process, the workloads of a pair train in turn, `--rounds` times each, `--warmup + --steps` steps a
round; a `TrainerCallback`, added after the trainer's own, times each step from `on_step_begin` to `on_step_end`
(after the momentum update and the enqueue; data loading and logging are outside), and the first `--warmup` steps
of each round are dropped. The median step gives the last lines, `overhead_ratio_<pair>: moma / baseline`; the
ratio of each round's medians shows the spread. On CUDA the runs use bf16 and `channels_last` networks, and each
step is timed between `torch.cuda.synchronize()` calls.

`parts`: each piece MoMA adds to a step, run alone at the step's shapes on the trainer's own model (queue full):
`g_S`/`A_q` forward and backward, `g_T`/`A_k`, the K x D queue product (`info_nce` forward and backward), the
optimiser step and clipping of the heads, the EMA (`torch._foreach_lerp_`), the key gather, the enqueue,
`compute_loss`'s bookkeeping, the NaN guard and the Trainer's `floating_point_ops`; pieces in turn every round.
The table gives each piece's median, its spread over rounds and its share of the reference step (teacher forward +
student step, also run alone), and the ratio the pieces predict at this reference step and at twice it.

`memory`: each workload trains `--steps` steps in a fresh Python process, so that one's peak cannot hide in
another's. On CPU the figure is the process's peak RSS (`ru_maxrss`), and its RSS when the first step begins;
on CUDA `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` at that same point. The children
run with `MALLOC_MMAP_THRESHOLD_=131072` (`--glibc_malloc` drops it), so that CPU RSS follows live tensor memory
and identical runs give identical peaks. The last lines are `<pair>: moma_vs_baseline_peak` and
`<pair>: moma_vs_baseline_step_increment` (peak minus the figure before the first step)::

    python benchmarks/step_cost.py time                                  # CPU: batch 32, 112 px
    python benchmarks/step_cost.py time --device cuda --batch_size 128 --image_size 224
    python benchmarks/step_cost.py parts                                 # CPU: batch 32, 112 px
    python benchmarks/step_cost.py time --profile --rounds 3             # where MoMA's extra time goes, by op
    python benchmarks/step_cost.py memory                                # CPU: batch 32, 224 px
    python benchmarks/step_cost.py memory --device cuda --batch_size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

from moma_hf import DistillationTrainer, DistillationTrainingArguments, build_student, distillation_model_class
from moma_hf.data import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, load_rgb_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nct-crc-mini"
PAIRS = ("momentum", "frozen_vit")
WORKLOADS = ("baseline", "moma", "kd")
MARKER = "STEP_COST_RESULT "  # prefix of a memory child's one result line, so library prints cannot confuse the parent


def load_examples(data_dir: Path, batch_size: int, image_size: int) -> tuple[list[dict], dict[int, str]]:
    """The first `batch_size` images of `data_dir/<class>/<file>` (sorted, cycled if too few), normalised.

    Returns `([{"pixel_values": (3, S, S), "labels": int}, ...], id2label)`.
    """
    from torchvision.transforms import v2

    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    files = sorted(f for c in classes for f in (data_dir / c).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"No images under {data_dir}: pass --data_dir pointing at nct-crc-mini.")
    files = [files[i % len(files)] for i in range(batch_size)]
    transform = v2.Compose([build_eval_transform(image_size), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    examples = [{"pixel_values": transform(load_rgb_image(f)), "labels": classes.index(f.parent.name)} for f in files]
    return examples, dict(enumerate(classes))


def build_networks(pair: str, id2label: dict, image_size: int) -> tuple[nn.Module, nn.Module]:
    """`(student, teacher)` of `pair`, randomly initialised; both classify `id2label`, so logit KD can run."""
    student, _ = build_student("resnet18", id2label, image_size=image_size)
    if pair == "momentum":
        return student, copy.deepcopy(student)
    # ViT-S/16 sizes, the size of the small pathology foundation models used as frozen teachers.
    config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       image_size=image_size, patch_size=16, id2label=dict(id2label),
                       label2id={v: k for k, v in id2label.items()})
    return student, ViTForImageClassification(config)


class TeacherThenStudent(nn.Module):
    """The baseline's model: the teacher's forward (eval mode, `no_grad`), then the student's, with its CE loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> "TeacherThenStudent":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        with torch.no_grad():
            self.teacher(pixel_values=pixel_values)
        return self.student(pixel_values=pixel_values, labels=labels)


def build_trainer(workload: str, pair: str, examples: list[dict], id2label: dict, args, output_dir: str,
                  callbacks: list[TrainerCallback]) -> Trainer:
    """The Trainer that runs `workload` on `pair`'s networks for `args.steps` (+ `args.warmup`) steps."""
    student, teacher = build_networks(pair, id2label, args.image_size)
    if args.device == "cuda":
        student, teacher = (m.to(memory_format=torch.channels_last) for m in (student, teacher))
    settings = dict(
        output_dir=output_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, lr_scheduler_type="constant", optim="sgd", optim_args="momentum=0.9",
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=args.device == "cpu", bf16=args.device == "cuda", torch_compile=args.compile, seed=0,
        remove_unused_columns=False,
    )
    if workload == "baseline":
        trainer = Trainer(model=TeacherThenStudent(student, teacher), args=TrainingArguments(**settings),
                          train_dataset=examples)
    else:
        model = distillation_model_class(workload).from_student_and_teacher(
            student, teacher, dict(id2label), method=workload, projection_dim=512, num_attention_heads=4,
            queue_size=args.queue_size, global_batch_size=args.batch_size,
            teacher_update="momentum" if pair == "momentum" else "frozen",
        )
        trainer = DistillationTrainer(model=model, args=DistillationTrainingArguments(**settings),
                                      train_dataset=examples)
    # Added last, after the trainer's own callbacks: passed to the constructor they would come before
    # DistillationStepCallback, and `on_step_end` would stop the clock before the momentum update and the enqueue.
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def synchronize() -> None:
    """Wait for queued CUDA work, so that a clock reading covers it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Seconds of every optimiser step, from `on_step_begin` to `on_step_end`, of every `train()` it attends."""

    def __init__(self):
        self.rounds: list[list[float]] = []
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.rounds.append([])

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.rounds[-1].append(time.perf_counter() - self._start)


class OpProfile(TrainerCallback):
    """`time --profile`: the self CPU time of every op over the timed steps of every `train()` it attends, summed.

    The profiler's window opens after the warm-up steps and closes at the last step's end, so the end-of-training
    state check and the export are outside it, as they are outside the step clock.
    """

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.steps_seen = warmup, steps, 0
        self.self_ms: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.profiler = profile(activities=[ProfilerActivity.CPU],
                                schedule=schedule(wait=self.warmup, warmup=0, active=self.steps, repeat=1))
        self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.stop()
        self.steps_seen += self.steps
        for event in self.profiler.key_averages():
            self.self_ms[event.key] = self.self_ms.get(event.key, 0.0) + event.self_cpu_time_total / 1000


def print_op_differences(pair: str, moma: OpProfile, baseline: OpProfile, top: int = 15) -> None:
    """The ops whose self time per step differs most between the MoMA and the baseline step of `pair`."""
    per_step = {name: (moma.self_ms.get(name, 0.0) / moma.steps_seen, baseline.self_ms.get(name, 0.0)
                       / baseline.steps_seen) for name in {*moma.self_ms, *baseline.self_ms}}
    print(f"\n{pair}: self CPU time per step, MoMA against the baseline (torch.profiler, timed steps)\n"
          "| op | baseline ms | MoMA ms | difference |\n| --- | --- | --- | --- |")
    for name, (m, b) in sorted(per_step.items(), key=lambda item: item[1][1] - item[1][0])[:top]:
        print(f"| {name} | {b:.2f} | {m:.2f} | {m - b:+.2f} |")
    total_m, total_b = (sum(values) for values in zip(*per_step.values()))
    print(f"| all ops | {total_b:.1f} | {total_m:.1f} | {total_m - total_b:+.1f} |")


def measure_time(args) -> dict[str, float]:
    """`time`: the median step of each workload of each pair; prints the table and the ratio lines."""
    examples, id2label = load_examples(args.data_dir, args.batch_size, args.image_size)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), batch {args.batch_size}, {args.image_size} px, median of "
          f"{args.rounds} x {args.steps} steps (each round after {args.warmup}), queue {args.queue_size}, "
          f"torch {torch.__version__}" + (", torch.compile" if args.compile else ""))
    print("| pair | baseline: teacher forward + student step | MoMA step | KD step | MoMA / baseline | KD / baseline |"
          "\n| --- | --- | --- | --- | --- | --- |")
    ratios, per_round = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            clocks = {workload: StepClock() for workload in WORKLOADS}
            profiles = {w: OpProfile(args.warmup, args.steps) for w in WORKLOADS if args.profile}
            trainers = {w: build_trainer(w, pair, examples, id2label, args, f"{tmp}/{pair}-{w}",
                                         [clocks[w], *([profiles[w]] if profiles else [])]) for w in WORKLOADS}
            for _ in range(args.rounds):  # in turn, so that drift of a shared machine hits every workload alike
                for trainer in trainers.values():
                    trainer.train()
            median = {w: statistics.median(t for r in clock.rounds for t in r[args.warmup:])
                      for w, clock in clocks.items()}
            ratios[pair] = median["moma"] / median["baseline"]
            # The ratio of each round's medians: rounds ran back to back, so their spread shows the machine's drift.
            per_round[pair] = [statistics.median(m[args.warmup:]) / statistics.median(b[args.warmup:])
                               for m, b in zip(clocks["moma"].rounds, clocks["baseline"].rounds)]
            print(f"| {pair} | " + " | ".join(f"{1000 * median[w]:.1f} ms" for w in WORKLOADS)
                  + f" | {ratios[pair]:.3f} | {median['kd'] / median['baseline']:.3f} |", flush=True)
            if profiles:
                print_op_differences(pair, profiles["moma"], profiles["baseline"])
    for pair, ratio in ratios.items():
        print(f"{pair}: MoMA / baseline per round: {', '.join(f'{r:.3f}' for r in per_round[pair])}")
    for pair, ratio in ratios.items():
        print(f"overhead_ratio_{pair}: {ratio:.3f}")
    return ratios


def moma_parts(trainer, examples: list[dict], args) -> dict[str, Callable[[], object]]:
    """MoMA's fixed costs, each a callable that runs one piece of a MoMA step alone at the step's shapes.

    The model is the trainer's own `MoMAForDistillation`, its queue full (the steady state); the first two
    entries are the work every distillation does, for scale. Features are random: time does not depend on values.
    """
    from transformers import default_data_collator

    from moma_hf.losses import info_nce
    from moma_hf.networks.backbones import feature_dim

    model, batch = trainer.distillation_model, default_data_collator(examples)
    model.train()
    model(**batch)  # fits a frozen teacher's g_T once, as the first step does
    model.enqueue(torch.nn.functional.normalize(torch.randn(args.queue_size, model.config.projection_dim), dim=-1))
    features = torch.randn(args.batch_size, feature_dim(model.student), requires_grad=True)
    teacher_features = torch.randn(args.batch_size, feature_dim(model.teacher))
    query = torch.nn.functional.normalize(torch.randn(args.batch_size, model.config.projection_dim), dim=-1)
    query.requires_grad_(True)
    with torch.no_grad():
        keys = model.key_attention(model.key_head(teacher_features))
    outputs = model(**batch)
    extra = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("student.")]
    for p in extra:
        p.grad = torch.randn_like(p)
    extra_optimizer = torch.optim.SGD(extra, lr=1e-3, momentum=0.9)
    student_optimizer = torch.optim.SGD(model.student.parameters(), lr=1e-3, momentum=0.9)
    labels = batch["labels"]
    guard, flags = trainer.step_guard, torch.zeros(len(trainer.step_guard.term_names))

    def student_step():
        student_optimizer.zero_grad()
        model.student(pixel_values=batch["pixel_values"], labels=labels).loss.backward()
        student_optimizer.step()

    def query_side():  # g_S and A_q, forward and backward
        model.query_attention(model.query_head(features)).backward(torch.ones(args.batch_size, query.shape[1]))

    def queue_product():  # the K x D product, mask, softmax over K + 1, backward to the query
        info_nce(query, keys, model.key_queue.queue, model.config.contrastive_temperature,
                 model.key_queue.valid_mask()).backward()

    def key_side():
        with torch.no_grad():
            model.key_attention(model.key_head(teacher_features))

    def extras_step():
        extra_optimizer.step()
        torch.nn.utils.clip_grad_norm_(extra, 1.0)

    # Without keys, so that nothing piles up to enqueue: the gather is timed on its own below.
    keyless = _Replay(type(outputs)(**{k: v for k, v in outputs.items() if k != "contrastive_keys"}))

    def nan_guard():
        guard.record(flags)
        guard.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)

    def teacher_forward():
        with torch.no_grad():
            model.teacher(pixel_values=batch["pixel_values"])

    return {
        "student step (forward, CE, backward, SGD)": student_step,
        "teacher forward (no grad)": teacher_forward,
        "g_S + A_q forward and backward": query_side,
        "g_T + A_k forward (no grad)": key_side,
        "queue product: info_nce forward and backward": queue_product,
        "SGD step + grad clip of the heads and attention": extras_step,
        "EMA: _foreach_lerp_ over the key-side tensors": model.momentum_update,
        "key gather (accelerator.gather)": lambda: trainer.accelerator.gather(keys),
        "enqueue": lambda: model.enqueue(keys),
        "compute_loss bookkeeping: term stacking, NaN record": lambda: trainer.compute_loss(keyless, batch),
        "NaN guard: record + pre-optimizer check (host sync)": nan_guard,
        "Trainer's floating_point_ops (walks the parameters)": lambda: trainer.floating_point_ops(batch),
    }


class _Replay(nn.Module):
    """A model whose forward returns fixed outputs: `compute_loss(_Replay(out), batch)` times the bookkeeping alone."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **inputs):
        return self.outputs


def measure_parts(args) -> dict[str, dict[str, float]]:
    """`parts`: each piece of a MoMA step alone, `--repeats_per_part` calls a round, pieces in turn every round.

    Prints, per pair, the median ms per call, the spread (min-max of the round medians) and each MoMA-only
    piece's share of the reference step (teacher forward + student step), then the ratio those pieces predict.
    """
    examples, id2label = load_examples(args.data_dir, args.batch_size, args.image_size)
    print(f"per-part cost, device {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.image_size} px, queue {args.queue_size}, D 512, 4 heads, median of {args.rounds} rounds x "
          f"{args.repeats_per_part} calls")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            trainer = build_trainer("moma", pair, examples, id2label, args, f"{tmp}/{pair}", [])
            parts = moma_parts(trainer, examples, args)
            rounds: dict[str, list[float]] = {name: [] for name in parts}
            for _ in range(args.rounds):
                for name, part in parts.items():
                    part()  # warm-up call
                    synchronize()
                    start = time.perf_counter()
                    for _ in range(args.repeats_per_part):
                        part()
                    synchronize()
                    rounds[name].append((time.perf_counter() - start) / args.repeats_per_part)
            results[pair] = print_parts(pair, rounds)
    return results


def print_parts(pair: str, rounds: dict[str, list[float]]) -> dict[str, float]:
    """Print one pair's table; the first two parts are the reference step, the others MoMA's fixed costs."""
    median = {name: statistics.median(values) for name, values in rounds.items()}
    names = list(median)
    reference = median[names[0]] + median[names[1]]
    print(f"\n| {pair} | ms (median) | spread (ms) | share of the reference step |\n| --- | --- | --- | --- |")
    for name in names:
        share = "reference" if name in names[:2] else f"{100 * median[name] / reference:.2f}%"
        print(f"| {name} | {1000 * median[name]:.2f} | {1000 * min(rounds[name]):.2f}-{1000 * max(rounds[name]):.2f}"
              f" | {share} |")
    fixed = sum(median[name] for name in names[2:])
    print(f"{pair}: fixed_ms: {1000 * fixed:.1f}, reference_step_ms: {1000 * reference:.1f}, predicted ratio "
          f"{1 + fixed / reference:.3f}; at twice the reference step: {1 + fixed / (2 * reference):.3f}")
    return {**median, "fixed": fixed, "reference": reference}


def current_memory(device: str) -> int:
    """Bytes in use now: RSS on CPU (`/proc/self/status`), allocated tensor memory on CUDA."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the peak so far, an upper bound


def peak_memory(device: str) -> int:
    """Peak bytes: the process's peak RSS on CPU (`ru_maxrss` is KiB on Linux), the allocator's peak on CUDA."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryProbe(TrainerCallback):
    """The memory in use when the first step begins (the models, optimiser and batch built), and the peak after
    each step."""

    def __init__(self, device: str):
        self.device, self.before, self.peaks = device, None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.before is None:
            synchronize()
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.before = current_memory(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.peaks.append(peak_memory(self.device))


def run_memory_child(args) -> dict:
    """One workload of one pair, `--steps` steps in this process; its memory figures (bytes)."""
    examples, id2label = load_examples(args.data_dir, args.batch_size, args.image_size)
    probe = MemoryProbe(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        args.warmup = 0
        build_trainer(args.child, args.pairs[0], examples, id2label, args, tmp, [probe]).train()
    return {"workload": args.child, "pair": args.pairs[0], "device": args.device, "before": probe.before,
            "peak": probe.peaks[-1], "peak_after_each_step": probe.peaks}


def spawn(workload: str, pair: str, args) -> dict:
    """Run one memory workload in a fresh interpreter and parse its result line."""
    command = [sys.executable, str(Path(__file__).resolve()), "memory", "--child", workload, "--pairs", pair,
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


def measure_memory(args) -> dict:
    """`memory`: every workload of every pair in its own process, `--repeats` times, alternated; prints the table
    and the ratio lines, and returns the figures."""
    kind = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"{kind}, device {args.device}, batch {args.batch_size}, {args.image_size} px, {args.steps} steps, "
          f"queue {args.queue_size}, {args.repeats} repeat(s), "
          f"{'glibc default malloc' if args.glibc_malloc else 'MALLOC_MMAP_THRESHOLD_=131072'}, data {args.data_dir}")
    mib = 2.0**20
    print("| pair | workload | before first step (MiB) | peak (MiB) | step increment (MiB) |\n"
          "| --- | --- | --- | --- | --- |")
    summary: dict = {"device": args.device, "batch_size": args.batch_size, "image_size": args.image_size,
                     "steps": args.steps, "queue_size": args.queue_size, "glibc_malloc": args.glibc_malloc,
                     "pairs": {}}
    for pair in args.pairs:
        runs: dict[str, list[dict]] = {"baseline": [], "moma": []}
        for _ in range(args.repeats):
            for workload in runs:  # alternate, so that load on a shared machine hits both alike
                result = spawn(workload, pair, args)
                runs[workload].append(result)
                print(f"| {pair} | {workload} | {result['before'] / mib:.0f} | {result['peak'] / mib:.0f} | "
                      f"{(result['peak'] - result['before']) / mib:.0f} |", flush=True)
        # Medians over repeats; with one repeat they are the single figures.
        peak = {w: statistics.median(r["peak"] for r in rs) for w, rs in runs.items()}
        increment = {w: statistics.median(r["peak"] - r["before"] for r in rs) for w, rs in runs.items()}
        summary["pairs"][pair] = {"moma_vs_baseline_peak": peak["moma"] / peak["baseline"],
                                  "moma_vs_baseline_step_increment": increment["moma"] / increment["baseline"],
                                  "runs": runs}
    for pair, figures in summary["pairs"].items():
        print(f"{pair}: moma_vs_baseline_peak: {figures['moma_vs_baseline_peak']:.3f}")
        print(f"{pair}: moma_vs_baseline_step_increment: {figures['moma_vs_baseline_step_increment']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None):
    """Parse the measure and its flags, run it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measure", choices=("time", "parts", "memory"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, help="default: 112 px for time, 224 px for memory")
    parser.add_argument("--steps", type=int, help="timed steps a round (default 5), or memory steps (default 2)")
    parser.add_argument("--queue_size", type=int, default=16384, help="MoMA's K; lower it to attribute memory")
    parser.add_argument("--data_dir", type=Path, default=DATA)
    parser.add_argument("--compile", action="store_true", help="train every workload with --torch_compile")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 2 in each memory child)")
    timing = parser.add_argument_group("time")
    timing.add_argument("--rounds", type=int, default=4, help="train() calls per workload, in turn")
    timing.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each round")
    timing.add_argument("--profile", action="store_true", help="time: also print the ops whose self time differs "
                        "most between MoMA and the baseline (the profiler slows every step alike)")
    timing.add_argument("--repeats_per_part", type=int, default=10, help="parts: calls of each piece a round")
    memory = parser.add_argument_group("memory")
    memory.add_argument("--repeats", type=int, default=1, help="baseline/moma children per pair, alternated")
    memory.add_argument("--glibc_malloc", action="store_true", help="keep glibc's adaptive mmap threshold (noisier)")
    memory.add_argument("--json", type=Path, help="also write the figures and ratios here")
    memory.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (224 if args.measure == "memory" else 112)
    args.steps = args.steps or (5 if args.measure == "time" else 2)
    torch.manual_seed(0)
    if args.threads and not args.child:
        torch.set_num_threads(args.threads)
    args.threads = args.threads or 2  # memory children run one at a time, so each may use every core
    if args.measure == "time":
        return measure_time(args)
    if args.measure == "parts":
        return measure_parts(args)
    if args.child:
        torch.set_num_threads(args.threads)
        print(MARKER + json.dumps(run_memory_child(args)), flush=True)
        return None
    return measure_memory(args)


if __name__ == "__main__":
    main()
