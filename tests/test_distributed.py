"""DistillationTrainer under 2 real gloo CPU processes (``accelerate launch --multi_gpu --num_processes 2``).

Each case launches ``tests/_distributed_worker.py`` for real on 2 processes x batch ``B`` and, at the same time, as
a plain single process over the same global batches (the reference); both run a real ``DistillationTrainer`` for
``STEPS`` optimiser steps on nct-crc-mini patches and record, per rank, the final state dict and per-step
losses, keys, queue, pointer and gradients (see the worker's docstring). The tests then check the issue's
requirements:

* every process ends with bit-identical parameters and buffers (queue, ``queue_ptr``, teacher, ``g_T``, ``A_k``)
  and sees bit-identical all-reduced gradients of the student, ``g_S`` and ``A_q``, although the processes' local
  batches, keys and losses differ;
* every step enqueues the keys of the *global* batch in global sample order (rank 0's samples, then rank 1's),
  and ``queue_ptr`` advances by the global batch ``2B`` per step (the pointer wraps: ``STEPS * 2B > K``);
* losses, keys, gradients and the whole final state agree with the single-process reference within float
  tolerance.

The references are chosen so the runs agree *by design*:

* ``moma`` (batch attention, momentum teacher): ``A_q``/``A_k`` attend within each process's local batch (that is
  the method: attention is over the per-device batch, not the gathered one), so 1 process with batch ``2B``
  would compute something else. The matching single-process run is batch ``B`` with 2 gradient-accumulation
  steps: micro-batch 0 is rank 0's batch, micro-batch 1 is rank 1's, the Trainer divides each loss by 2
  (``accepts_loss_kwargs = False``) so the accumulated gradient is DDP's mean, and the key pathway and queue only
  change after the optimiser step in both runs. This run keeps ``ddp_broadcast_buffers=False``, so no buffer
  (queue, pointer) is made equal by DDP's per-forward broadcast from rank 0: the identity across ranks is the
  library's own doing.
* ``moma-noattn`` (no attention, frozen teacher with ``g_T`` a PCA projection fitted on the first all-gathered
  global batch): every sample is independent, so the reference is 1 process with batch ``2B``. This run keeps the
  Trainer's default DDP settings (buffers broadcast at every forward, as users run it); the per-step queue is
  recorded after the local enqueue, before the next broadcast, so it still checks the gathered keys.

Both use LayerNorm models (``conftest.tiny_vit`` as student and teacher). With BatchNorm, results differ by
design: under DDP each process normalises with its local batch statistics (no SyncBatchNorm) and DDP
broadcasts rank 0's running statistics, while one process normalises over its whole batch (or updates the
running statistics twice per step when accumulating).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, launch_command, launch_env, tiny_vit
from safetensors.torch import load_file

WORKER = REPO / "tests" / "_distributed_worker.py"
B, STEPS, K = 4, 6, 32  # per-device batch, optimiser steps, queue size
G = 2 * B  # the global batch: keys enqueued per step
CASES = {
    "moma": {
        "model": ["--method", "moma", "--teacher_update", "momentum"],
        "launch": ["--batch_size", str(B), "--broadcast_buffers", "false"],
        "reference": ["--batch_size", str(B), "--grad_accum", "2"],
    },
    "moma-noattn": {
        "model": ["--method", "moma-noattn", "--teacher_update", "frozen"],
        "launch": ["--batch_size", str(B)],
        "reference": ["--batch_size", str(G)],
    },
}
TIMEOUT = 420  # seconds for one subprocess; 4 of them run at once on 2 cores

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


class Run:
    """The records of one run: ``ranks[r]`` is ``(json record, tensors)`` of process ``r``."""

    def __init__(self, out: Path, world_size: int):
        self.ranks = [
            (json.loads((out / f"rank{r}.json").read_text()), load_file(out / f"rank{r}.safetensors"))
            for r in range(world_size)
        ]

    def record(self, rank: int = 0) -> dict:
        return self.ranks[rank][0]

    def tensors(self, rank: int = 0) -> dict[str, torch.Tensor]:
        return self.ranks[rank][1]

    def grads(self, step: int, rank: int = 0, prefix: str = "grad") -> dict[str, torch.Tensor]:
        head = f"{prefix}/{step}/"
        return {k[len(head):]: v for k, v in self.tensors(rank).items() if k.startswith(head)}

    def final(self, rank: int = 0) -> dict[str, torch.Tensor]:
        return {k[len("final/"):]: v for k, v in self.tensors(rank).items() if k.startswith("final/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch, for every case, the 2-process run and the 1-process reference, all at once; load their records."""
    root = tmp_path_factory.mktemp("distributed")
    env = launch_env()
    jobs = {}
    for case, spec in CASES.items():
        for kind in ("launch", "reference"):
            out = root / case / kind
            out.mkdir(parents=True)
            args = ["--out", out, "--steps", STEPS, "--queue_size", K, *spec["model"], *spec[kind]]
            command = launch_command(WORKER, *args) if kind == "launch" else [sys.executable, str(WORKER),
                                                                             *map(str, args)]
            log = open(out / "log.txt", "w")
            jobs[case, kind] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log, out)
    try:
        for (case, kind), (process, log, out) in jobs.items():
            returncode = process.wait(timeout=TIMEOUT)
            log.close()
            assert returncode == 0, f"{case} {kind} failed:\n" + (out / "log.txt").read_text()[-4000:]
    finally:
        for process, log, _ in jobs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    return {case: (Run(root / case / "launch", 2), Run(root / case / "reference", 1)) for case in CASES}


@pytest.fixture(params=list(CASES))
def case(request, runs):
    """``(case name, 2-process run, single-process reference)``."""
    return (request.param, *runs[request.param])


def _steps(run: Run, rank: int = 0) -> list[dict]:
    steps = run.record(rank)["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    return steps


@pytest.mark.slow
def test_the_launch_is_two_ddp_processes_and_each_gets_its_share_of_the_global_batch_in_order(case):
    name, ddp, ref = case
    for rank in (0, 1):
        record = ddp.record(rank)
        assert record["rank"] == rank and record["world_size"] == 2 and "MULTI_CPU" in record["distributed_type"]
        assert record["wrapped_model"] == "DistributedDataParallel"
        assert record["broadcast_buffers"] is (name != "moma")
        assert record["find_unused_parameters"] is False  # every trainable parameter gets a gradient
        # the queue is kept identical by the gathered enqueue, not by DDP's buffer broadcast
        assert record["ddp_ignored"] == ["key_queue.queue", "key_queue.queue_len", "key_queue.queue_ptr"]
        assert record["global_batch_size"] == G
        # The collator's sample ids never reach MoMAForDistillation.forward.
        assert record["forward_kwargs"] == ["labels", "pixel_values"]
        # Global step t: rank 0 has samples [tG, tG + B), rank 1 has [tG + B, tG + 2B).
        for t, step in enumerate(_steps(ddp, rank)):
            first = t * G + rank * B
            assert [m["sample_ids"] for m in step["micro_batches"]] == [list(range(first, first + B))]
    reference = ref.record()
    assert reference["world_size"] == 1 and reference["wrapped_model"] == "MoMAForDistillation"
    assert reference["global_batch_size"] == G and reference["forward_kwargs"] == ["labels", "pixel_values"]
    assert reference["teacher_update"] == ddp.record()["teacher_update"] == CASES[name]["model"][-1]
    assert reference["use_attention"] == ddp.record()["use_attention"] == (name == "moma")
    for t, step in enumerate(_steps(ref)):
        ids = [m["sample_ids"] for m in step["micro_batches"]]
        # GA 2: the micro-batches are rank 0's then rank 1's batch; batch 2B: one batch of both.
        assert sum(ids, []) == list(range(t * G, (t + 1) * G)) and len(ids) == reference["gradient_accumulation_steps"]


def test_every_rank_holds_bit_identical_state_and_all_reduced_gradients(case):
    name, ddp, _ = case
    final0, final1 = ddp.final(0), ddp.final(1)
    assert final0.keys() == final1.keys()
    for required in ("key_queue.queue", "key_queue.queue_ptr", "key_queue.queue_len"):
        assert required in final0
    for prefix in ("student.", "teacher.", "query_head.", "key_head.", "query_attention.", "key_attention."):
        if name == "moma-noattn" and prefix.endswith("attention."):  # nn.Identity: nothing to hold
            continue
        assert any(k.startswith(prefix) for k in final0), prefix
    unequal = [k for k in final0 if not torch.equal(final0[k], final1[k])]
    assert not unequal, f"the ranks' final states differ in {unequal}"
    if name == "moma-noattn":
        assert final0["key_head.fitted"].item() and final0["key_head.mean"].abs().sum() > 0

    for step in range(1, STEPS + 1):
        grads0, grads1 = ddp.grads(step, 0), ddp.grads(step, 1)
        assert grads0.keys() == grads1.keys()
        modules = {k.split(".")[0] for k in grads0}
        assert modules == {"student", "query_head", *(["query_attention"] if name == "moma" else [])}
        unequal = [k for k in grads0 if not torch.equal(grads0[k], grads1[k])]
        assert not unequal, f"step {step}: the ranks' gradients differ in {unequal}"
        if step > 1:  # the queue is empty at step 1, so the contrastive term (g_S, A_q's only loss) is 0 there
            for module in modules:
                assert any(g.abs().sum() > 0 for k, g in grads0.items() if k.startswith(module + ".")), (step, module)

    # Identity is not trivial: the ranks trained on different samples, with different keys and losses.
    for step0, step1 in zip(_steps(ddp, 0), _steps(ddp, 1)):
        (micro0,), (micro1,) = step0["micro_batches"], step1["micro_batches"]
        assert not set(micro0["sample_ids"]) & set(micro1["sample_ids"])
        assert micro0["loss_ce"] != micro1["loss_ce"]
    for step in range(1, STEPS + 1):
        keys0, keys1 = ddp.tensors(0)[f"local_keys/{step}"], ddp.tensors(1)[f"local_keys/{step}"]
        assert keys0.shape == keys1.shape == (B, 32) and (keys0 - keys1).abs().max() > 1e-3


@pytest.mark.parametrize("run_name", ["launch", "reference"])
def test_the_queue_receives_the_global_batch_in_rank_order_and_the_pointer_advances_by_it(case, run_name):
    name, ddp, ref = case
    assert STEPS * G > K  # the pointer wraps within the run
    run, ranks = (ddp, (0, 1)) if run_name == "launch" else (ref, (0,))
    for rank in ranks:
        previous = torch.zeros(K, 32)
        for t, step in enumerate(_steps(run, rank), start=1):
            # The global batch in global sample order: rank 0's keys then rank 1's (or the reference's batch).
            expected = torch.cat([run.tensors(r)[f"local_keys/{t}"] for r in ranks])
            assert expected.shape == (G, 32)
            assert torch.equal(run.tensors(rank)[f"gathered_keys/{t}"], expected)
            queue = run.tensors(rank)[f"queue/{t}"]
            slots = torch.arange((t - 1) * G, t * G) % K
            assert torch.equal(queue[slots], expected), f"step {t}: the queue rows are not the global batch"
            untouched = torch.ones(K, dtype=torch.bool)
            untouched[slots] = False
            assert torch.equal(queue[untouched], previous[untouched]), f"step {t} overwrote other rows"
            assert step["queue_ptr"] == (t * G) % K
            assert step["queue_len"] == min(t * G, K)
            previous = queue
        final = run.final(rank)
        assert torch.equal(final["key_queue.queue"], previous)
        assert final["key_queue.queue_ptr"].item() == (STEPS * G) % K
        assert final["key_queue.queue_len"].item() == K
        logs = run.record(rank)["log_history"]
        assert [h["queue_fill"] for h in logs] == [min(t * G, K) / K for t in range(1, STEPS + 1)]


def test_two_processes_match_the_single_process_reference(case):
    name, ddp, ref = case
    close = dict(rtol=1e-4, atol=1e-5)
    # Logged losses: the mean over ranks (2 processes) / over micro-batches (GA) / over the batch (2B).
    logs0, logs1, logs_ref = ddp.record(0)["log_history"], ddp.record(1)["log_history"], ref.record()["log_history"]
    assert len(logs0) == len(logs_ref) == STEPS
    assert [h["loss"] for h in logs0] == [h["loss"] for h in logs1]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in logs0]), torch.tensor([h["loss"] for h in logs_ref]),
                               rtol=1e-5, atol=1e-6)
    for term in ("loss_ce", "loss_kd", "loss_moma"):  # the trainer logs them rounded to 4 decimals
        for h, h_ref in zip(logs0, logs_ref):
            assert abs(h[term] - h_ref[term]) <= 1.01e-4, (term, h, h_ref)
    assert any(h["loss_moma"] > 0 for h in logs0) and any(h["loss_kd"] > 0 for h in logs0)

    # Unrounded per-process losses and keys: the reference's micro-batch r (GA) is rank r's batch; a 2B batch's
    # mean is the mean of the ranks' means (all terms are per-sample means over equal halves).
    for t, (s0, s1, s_ref) in enumerate(zip(_steps(ddp, 0), _steps(ddp, 1), _steps(ref)), start=1):
        local = torch.tensor([[m[term] for term in ("loss", "loss_ce", "loss_kd", "loss_moma")]
                              for m in s0["micro_batches"] + s1["micro_batches"]], dtype=torch.float64)
        reference = torch.tensor([[m[term] for term in ("loss", "loss_ce", "loss_kd", "loss_moma")]
                                  for m in s_ref["micro_batches"]], dtype=torch.float64)
        if len(reference) == 1:
            local = local.mean(0, keepdim=True)
        torch.testing.assert_close(local, reference, **close)
        torch.testing.assert_close(logs0[t - 1]["loss"], local[:, 0].mean().item(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp.tensors()[f"gathered_keys/{t}"], ref.tensors()[f"gathered_keys/{t}"], **close)

    # Gradients: DDP's all-reduced mean equals the single process's gradient of the global batch.
    for step in range(1, STEPS + 1):
        grads, grads_ref = ddp.grads(step), ref.grads(step)
        assert grads.keys() == grads_ref.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], grads_ref[k], **close, msg=lambda m: f"step {step} {k}: {m}")
    if name == "moma":
        # The reference's gradient after micro-batch 0 is rank 0's local gradient / 2: the processes' common
        # gradient is not rank 0's own, so it was all-reduced.
        for step in range(2, STEPS + 1):
            local = {k: 2 * g for k, g in ref.grads(step, prefix="grad_micro0").items()}
            for module in ("student.", "query_head.", "query_attention."):
                diff = max((ddp.grads(step)[k] - local[k]).abs().max().item() for k in local if k.startswith(module))
                assert diff > 1e-3, (step, module, diff)

    # The final state: student, heads, attention, teacher, queue, pointer.
    final, final_ref = ddp.final(), ref.final()
    assert final.keys() == final_ref.keys()
    for k in final:
        if final[k].is_floating_point():
            torch.testing.assert_close(final[k], final_ref[k], **close, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(final[k], final_ref[k]), k
    # Training moved the student (so agreement is not that of two untouched copies).
    torch.manual_seed(0)
    initial = tiny_vit().state_dict()
    moved = max((final[f"student.{k}"] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3
