"""Worker for ``tests/test_distributed.py``: a real ``DistillationTrainer`` run that records what each process holds.

Run either under ``accelerate launch --multi_gpu --num_processes 2`` on CPU (2 gloo processes, DDP), or as a
plain ``python tests/_distributed_worker.py`` (one process: the reference). Both paths run the same code.

What it trains: a ``MoMAForDistillation`` whose student and teacher are both ``conftest.tiny_vit()`` (a 2-layer
ViT at 64 px: LayerNorm only, dropout 0), for ``--steps`` optimiser steps over the real nct-crc-mini patches.
BatchNorm is avoided on purpose: under DDP each process normalises with the statistics of its *local* batch (no
SyncBatchNorm) and DDP broadcasts rank 0's running statistics, so a BN network cannot match a single-process
run over the same global batch, by design. With LayerNorm every sample is normalised on its own.

Data order is fixed: ``train_sampling_strategy="sequential"``, so the Trainer's sampler is a
``SequentialSampler`` and Accelerate's ``BatchSamplerShard`` gives rank ``r`` the underlying batches
``r, r + 2, r + 4, ...``. Global step ``t`` (0-based) of 2 processes x batch ``B`` therefore uses batch ``2t`` on
rank 0 and ``2t + 1`` on rank 1, i.e. samples ``[2tB, 2tB + 2B)`` in rank order; one process with batch ``B`` and
2 accumulation steps sees the same two batches as its two micro-batches, and one process with batch ``2B`` sees
them as one batch.

Each example carries a ``sample_id`` (its position in the sorted file list). The trainer subclass below pops it
from the inputs before ``DistillationTrainer.compute_loss`` (so ``MoMAForDistillation.forward`` never receives it, which
a forward pre-hook records), and wraps ``compute_loss`` and ``finish_optimizer_step`` to record, per step:

* per micro-batch: the sample ids, the unweighted/weighted loss terms and the local ``contrastive_keys``;
* the keys the step hands to ``MoMAForDistillation.enqueue`` (gathered across processes) and the queue,
  ``queue_ptr`` and ``queue_len`` after the enqueue (the library's own ``on_step_end`` callback calls
  ``finish_optimizer_step``);
* in ``on_pre_optimizer_step`` (DDP has all-reduced the gradients by then): the gradients of the student,
  ``query_head`` (``g_S``) and ``query_attention`` (``A_q``); in ``on_substep_end`` (accumulation runs only): the
  gradients after the first micro-batch, i.e. that micro-batch's local gradient / GA.

Optimiser: plain SGD, no gradient clipping (``max_grad_norm=0``), so the recorded gradients are exactly the mean
of the local ones and the parameters depend linearly on round-off. Adam would divide by ``sqrt(v)`` and turn the
round-off of gradients that are zero in exact arithmetic (e.g. the key-projection bias of attention: softmax is
shift-invariant, so that gradient is ~1e-9 noise) into O(lr) differences between two equally valid runs; the
optimiser runs identically on every process whichever it is, so SGD loses nothing for this test.

At the end it writes ``<out>/rank<r>.safetensors`` (the final full state dict under ``final/``, plus the
per-step tensors; never pickle) and ``<out>/rank<r>.json`` (scalars, ids, the Trainer's ``log_history``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import TrainerCallback

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from conftest import NCT_CLASSES, demo_patch_files, tiny_vit  # noqa: E402

from moma_hf import DistillationTrainer, DistillationTrainingArguments, MoMAForDistillation  # noqa: E402
from moma_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, load_rgb_image  # noqa: E402

QUERY_MODULES = ("student", "query_head", "query_attention")
TERMS = ("loss", "loss_ce", "loss_kd", "loss_moma")


class NCTPatches(Dataset):
    """All nct-crc-mini patches at 64 px, ImageNet-normalised, in sorted file order, with their position as id."""

    def __init__(self, image_size: int = 64):
        transform = build_eval_transform(image_size)
        files = demo_patch_files()
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.pixels = (torch.stack([transform(load_rgb_image(str(f))) for f in files]) - mean) / std
        self.labels = torch.tensor([NCT_CLASSES.index(f.parent.name) for f in files])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index], "sample_id": index}


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the examples; ``sample_id`` passes through as an int64 ``(B,)`` tensor."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([e["labels"] for e in examples]),
        "sample_id": torch.tensor([e["sample_id"] for e in examples], dtype=torch.int64),
    }


def query_grads(model: MoMAForDistillation) -> dict[str, torch.Tensor]:
    """The current ``.grad`` of every trainable tensor of the query pathway (student, g_S, A_q)."""
    grads = {}
    for prefix in QUERY_MODULES:
        for name, param in getattr(model, prefix).named_parameters():
            if param.requires_grad:
                assert param.grad is not None, f"{prefix}.{name} has no gradient"
                grads[f"{prefix}.{name}"] = param.grad.detach().clone()
    return grads


class RecordingTrainer(DistillationTrainer):
    """``DistillationTrainer`` that records each micro-batch and each optimiser step (it changes no computation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []  # one per optimiser step, JSON-able
        self.tensors: dict[str, torch.Tensor] = {}
        self._micro: list[dict] = []
        self._local_keys: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_id")  # the model must not receive it
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._micro.append({"sample_ids": sample_ids.tolist(),
                                **{name: outputs[name].item() for name in TERMS}})
            self._local_keys.append(outputs.contrastive_keys.clone())
        return (loss, outputs) if return_outputs else loss

    def finish_optimizer_step(self) -> None:
        moma = self.distillation_model
        enqueued: list[torch.Tensor] = []
        enqueue = moma.enqueue
        moma.enqueue = lambda keys: (enqueued.append(keys.clone()), enqueue(keys))[1]  # see what it is given
        try:
            super().finish_optimizer_step()
        finally:
            del moma.enqueue
        assert len(enqueued) == 1, f"{len(enqueued)} enqueue calls in one optimiser step"
        step = len(self.steps) + 1
        queue = moma.key_queue
        self.tensors[f"gathered_keys/{step}"] = enqueued[0]
        self.tensors[f"local_keys/{step}"] = torch.cat(self._local_keys)
        self.tensors[f"queue/{step}"] = queue.queue.clone()
        self.steps.append({"step": step, "micro_batches": self._micro, "queue_ptr": queue.queue_ptr.item(),
                           "queue_len": queue.queue_len.item()})
        self._micro, self._local_keys = [], []


class GradientRecorder(TrainerCallback):
    """Gradients of the query pathway before each optimiser step, and after the first micro-batch of a step."""

    def __init__(self, trainer: RecordingTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, grad in query_grads(self.trainer.distillation_model).items():
            self.trainer.tensors[f"grad/{state.global_step + 1}/{name}"] = grad

    def on_substep_end(self, args, state, control, **kwargs):
        if len(self.trainer._micro) == 1:  # only the first micro-batch of the step has been run
            for name, grad in query_grads(self.trainer.distillation_model).items():
                self.trainer.tensors[f"grad_micro0/{state.global_step + 1}/{name}"] = grad


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", choices=("moma", "moma-noattn"), required=True)
    parser.add_argument("--teacher_update", choices=("momentum", "frozen"), required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--queue_size", type=int, default=32)
    parser.add_argument("--broadcast_buffers", choices=("default", "false"), default="default",
                        help="DDP's broadcast_buffers: the Trainer's default (True) or False")
    args = parser.parse_args()
    out = Path(args.out)

    torch.manual_seed(0)
    student = tiny_vit()
    # Momentum mode: the key encoder starts as a copy of the query encoder (same seed); frozen: another network.
    torch.manual_seed(0 if args.teacher_update == "momentum" else 1)
    teacher = tiny_vit()
    assert student.config.hidden_dropout_prob == student.config.attention_probs_dropout_prob == 0.0

    training_args = DistillationTrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, optim="sgd", learning_rate=0.01, max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_drop_last=True,
        train_sampling_strategy="sequential", disable_tqdm=True,
        ddp_broadcast_buffers=None if args.broadcast_buffers == "default" else False,
        method=args.method, teacher_update=args.teacher_update, queue_size=args.queue_size, projection_dim=32,
        num_attention_heads=4, momentum=0.9,
    )
    model = MoMAForDistillation.from_student_and_teacher(
        student, teacher, dict(teacher.config.id2label), **training_args.distillation_config_kwargs()
    )
    forward_kwargs: set[str] = set()
    model.register_forward_pre_hook(lambda _m, _a, kwargs: forward_kwargs.update(kwargs), with_kwargs=True)

    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=NCTPatches(),
                               data_collator=collate)
    trainer.add_callback(GradientRecorder(trainer))
    trainer.train()

    moma = trainer.distillation_model
    rank = trainer.args.process_index
    tensors = {f"final/{name}": t.detach().clone().contiguous() for name, t in moma.state_dict().items()}
    tensors.update(trainer.tensors)
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    record = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped_model": type(trainer.model_wrapped).__name__,
        "broadcast_buffers": getattr(trainer.model_wrapped, "broadcast_buffers", None),
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "ddp_ignored": sorted(getattr(trainer.model_wrapped, "parameters_to_ignore", [])),
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "global_batch_size": training_args.global_batch_size,
        "teacher_update": moma.teacher_update,
        "use_attention": moma.config.use_attention,
        "forward_kwargs": sorted(forward_kwargs),
        "steps": trainer.steps,
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    # Leave the process group together: see the end of _bad_image_launch_worker.py.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
