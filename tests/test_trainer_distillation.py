"""DistillationTrainer on real patches: the loss falls, checkpoints keep the MoMA state, the export is a plain student;
it uses the Trainer's public hooks, and its few overrides keep the parent's signatures."""

import inspect
import json
import math

import pytest
import torch
import transformers
from conftest import make_trainer
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, Trainer, TrainerControl, TrainerState

from moma_hf import DistillationTrainer


def test_a_30_step_run_lowers_the_loss_logs_every_term_and_exports_the_student(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 30
    assert all({"loss_ce", "loss_kd", "loss_moma", "queue_fill", "data_wait_fraction", "labeled_fraction"} <= h.keys()
               for h in logs)
    assert all(h["labeled_fraction"] == 1.0 for h in logs)  # every nct-crc-mini patch has its label
    assert all(0 <= h["data_wait_fraction"] <= 1 for h in logs)
    assert logs[0]["queue_fill"] == 0.5 and logs[-1]["queue_fill"] == 1.0  # 16 keys a step into 32 slots
    # From step 3 on the queue is full, so the contrastive term has its final number of negatives.
    first, last = sum(h["loss"] for h in logs[2:7]) / 5, sum(h["loss"] for h in logs[-5:]) / 5
    assert last < 0.9 * first, (first, last)

    moma = trainer.distillation_model
    assert moma.key_queue.queue_ptr.item() == (30 * 16) % 32  # short last batches are dropped
    checkpoint = load_file(tmp_path / "checkpoint-30" / "model.safetensors")
    assert torch.equal(checkpoint["key_queue.queue"], moma.key_queue.queue)
    assert any(name.startswith("teacher.") for name in checkpoint)

    trainer.save_model()
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["model_type"] == "timm_wrapper" and "teacher" not in str(exported.get("architectures"))
    student = AutoModelForImageClassification.from_pretrained(tmp_path)  # no trust_remote_code
    pixels = torch.randn(4, 3, 64, 64)
    moma.eval()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(pixel_values=pixels).logits, moma.student(pixel_values=pixels).logits)
    assert "hub_token" not in (tmp_path / "training_args.json").read_text() or "<HUB_TOKEN>" in (
        tmp_path / "training_args.json").read_text()


def test_data_wait_fraction_is_the_time_spent_fetching_batches(small_moma, nct_mini_dir, tmp_path):
    import time

    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path)
    timer, args, state, control = trainer.data_wait, trainer.args, TrainerState(), TrainerControl()
    # The events in the order the Trainer's loop sends them; the batches are fetched just before on_step_begin.
    timer.on_train_begin(args, state, control)
    timer.on_epoch_begin(args, state, control)
    for _ in range(2):
        time.sleep(0.3)  # a DataLoader that keeps the step waiting
        timer.on_step_begin(args, state, control)
        time.sleep(0.1)  # the step's compute
        timer.on_step_end(args, state, control)
    logs = {"loss": 1.0}
    trainer.log(logs)
    # 0.6 s waiting in a window of 0.8 s, from the start of training to the log
    assert 0.6 <= logs["data_wait_fraction"] <= 0.85, logs
    time.sleep(0.2)  # logging, evaluating and saving are the loop's own work, not waiting
    timer.on_log(args, state, control)
    timer.on_save(args, state, control)
    timer.on_step_begin(args, state, control)
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["data_wait_fraction"] < 0.1, logs


def test_a_slow_data_loader_shows_in_the_data_wait_fraction_of_a_real_run(small_moma, nct_mini_dir, tmp_path):
    import time

    from transformers import TrainerCallback

    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=4, save_strategy="no")
    collate, slept = trainer.data_collator, []

    def slow_collate(examples):
        slept.append(0.3)
        time.sleep(0.3)  # every batch keeps the loop waiting this long (num_workers=0: in this process)
        return collate(examples)

    class LogTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.times.append(time.perf_counter())

    trainer.data_collator = slow_collate
    log_times = LogTimes()
    trainer.add_callback(log_times)
    trainer.train()
    fractions = [h["data_wait_fraction"] for h in trainer.state.log_history if "loss" in h]
    windows = [end - start for start, end in zip(log_times.times, log_times.times[1:])]
    assert len(fractions) == len(windows) == 4 and len(slept) >= 4  # accelerate reads one batch ahead
    for fraction, window in zip(fractions, windows):  # one step, so at least one 0.3 s fetch, in each log's window
        assert 0.9 * 0.3 <= fraction * window <= window, (fractions, windows)


def test_evaluation_uses_its_own_collator_and_keeps_every_example(small_moma, nct_mini_dir, tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, per_device_eval_batch_size=50)
    train_collator, dataset = trainer.data_collator, trainer.train_dataset
    assert len(dataset) == 129 and trainer.args.dataloader_drop_last  # training drops short batches
    trainer.eval_dataset = {"nct": dataset}
    for loader in (trainer.get_eval_dataloader("nct"), trainer.get_eval_dataloader(dataset),
                   trainer.get_test_dataloader(dataset)):
        assert loader.collate_fn is trainer.eval_data_collator
        batches = list(loader)
        assert [len(b["labels"]) for b in batches] == [50, 50, 29]  # the short last batch is kept
        assert "teacher_pixel_values" not in batches[0]  # no teacher input: the student alone is evaluated
    # Nothing was swapped on the trainer to build them.
    assert trainer.data_collator is train_collator and trainer.args.dataloader_drop_last
    assert trainer.evaluate()["eval_nct_samples_per_second"] > 0  # the Trainer's evaluation runs on it


def _comparable(signature: inspect.Signature) -> list[tuple]:
    """Name, kind and default of each parameter (annotations differ only in spelling)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_overridden_trainer_methods_match_the_parent_signature():
    ours = DistillationTrainer.__mro__[:DistillationTrainer.__mro__.index(Trainer)]  # with EvalCollatorMixin
    overridden = sorted({name for cls in ours for name, member in vars(cls).items()
                         if callable(member) and hasattr(Trainer, name)})
    assert overridden == ["__init__", "_save", "compute_loss", "create_model_card", "floating_point_ops",
                          "get_eval_dataloader", "get_test_dataloader", "log", "train"]
    # `_save` is the one private override; the class docstring names every override and says why.
    assert [name for name in overridden if name.startswith("_") and not name.startswith("__")] == ["_save"]
    assert all(f"`{name}`" in DistillationTrainer.__doc__ for name in overridden)
    version = f"transformers {transformers.__version__}"
    for name in overridden:
        ours, parents = inspect.signature(getattr(DistillationTrainer, name)), inspect.signature(getattr(Trainer, name))
        if name == "__init__":  # ours names the parent's leading parameters, adds keyword-only ones, passes the rest
            named = [p for p in _comparable(ours) if p[1] is inspect.Parameter.POSITIONAL_OR_KEYWORD]
            assert named == _comparable(parents)[:len(named)], (
                f"Trainer.__init__ changed its leading parameters in {version}: {parents}; DistillationTrainer "
                "passes them on by position")
            continue
        assert _comparable(ours) == _comparable(parents), (
            f"Trainer.{name} has a new signature in {version}: {parents}; DistillationTrainer.{name} overrides it as "
            f"{ours}. Update the override (see the DistillationTrainer docstring for why it exists).")


def test_the_flop_estimate_counts_the_parameters_once(small_moma, nct_mini_dir, tmp_path, monkeypatch):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, max_steps=1, save_strategy="no")
    model, pixels = trainer.distillation_model, torch.zeros(4, 3, 64, 64)
    expected = 6 * pixels.numel() * sum(p.numel() for p in model.parameters())  # no embeddings in an image model
    counts = []
    original = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters", lambda self, **kw: counts.append(1) or original(self, **kw))
    assert [trainer.floating_point_ops({"pixel_values": pixels}) for _ in range(3)] == [expected] * 3
    assert len(counts) == 1 and trainer.floating_point_ops({"labels": torch.zeros(4)}) == 0


def test_bf16_runs_the_whole_moma_step_and_keeps_the_queue_in_fp32(small_moma, nct_mini_dir, tmp_path):
    import math

    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / precision, max_steps=4, save_strategy="no",
                               bf16=precision == "bf16")
        dtypes = []
        trainer.model.query_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        trainer.train()
        runs[precision] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        queue = trainer.distillation_model.key_queue.queue
        assert queue.dtype == torch.float32 and trainer.distillation_model.key_queue.queue_len.item() == 32
        assert torch.isfinite(queue).all()
        torch.testing.assert_close(queue.norm(dim=1), torch.ones(32))  # enqueued keys stay unit rows
        # the projection heads really ran under bf16 autocast (or not)
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(math.isfinite(loss) for loss in runs["bf16"])
    # The first step starts from the same weights and batch: bf16 changes its loss by rounding only.
    assert abs(runs["bf16"][0] - runs["fp32"][0]) < 0.03 * runs["fp32"][0], runs


@pytest.mark.slow
def test_torch_compile_trains_the_moma_model_as_eager_does(small_moma, nct_mini_dir, tmp_path):
    # --torch_compile compiles the whole MoMAForDistillation (pooled_features' hooks included).
    logs = {}
    for compiled in (False, True):
        trainer = make_trainer(small_moma, nct_mini_dir, tmp_path / str(compiled), max_steps=2, save_strategy="no",
                               torch_compile=compiled, optim="sgd", learning_rate=0.05)
        trainer.train()
        logs[compiled] = [h for h in trainer.state.log_history if "loss" in h]
    eager, compiled = logs[False], logs[True]
    # Same weights and batch: the first step's loss agrees to kernel rounding (the queue is still empty, so the
    # contrastive term is 0 there).
    assert abs(compiled[0]["loss"] - eager[0]["loss"]) < 1e-4 * eager[0]["loss"], logs
    # The second step follows one SGD step on gradients that differ by that rounding: the label terms agree to
    # 0.1%. The contrastive term, computed on the first step's enqueued keys, usually agrees as tightly (1e-4),
    # but on a few augmentation draws (they depend on the data's path) it moved by up to 1.7%, cause not found.
    for term in ("loss_ce", "loss_kd"):
        assert abs(compiled[1][term] - eager[1][term]) <= 1e-3 * eager[1][term] + 1e-4, (term, logs)
    assert abs(compiled[1]["loss"] - eager[1]["loss"]) < 5e-2 * eager[1]["loss"], logs


def test_persistent_workers_are_refused_for_map_style_data(small_moma, nct_mini_dir, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="repeat epoch 0's augmentation"):
        make_trainer(small_moma, nct_mini_dir, tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)
    # A stream is one endless epoch whose examples carry their own epoch, so workers may persist.
    make_trainer(small_moma, nct_mini_dir, tmp_path, streaming=True, dataloader_num_workers=1,
                 dataloader_persistent_workers=True)


def test_a_learned_key_head_trains_in_the_trainer_logs_its_term_and_stays_off_chance(small_moma, nct_mini_dir,
                                                                                    tmp_path):
    trainer = make_trainer(small_moma, nct_mini_dir, tmp_path, frozen_key_head="learned", save_strategy="no")
    moma = trainer.distillation_model
    head_before = [p.detach().clone() for p in moma.key_head.parameters()]
    teacher_before = [p.detach().clone() for p in moma.teacher.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("loss_key_head" in h for h in logs)
    # A collapsed g_T (one key for every patch) puts its term at log(B) and the student's at log(K + 1).
    assert sum(h["loss_key_head"] for h in logs[-5:]) / 5 < 0.9 * math.log(16)
    assert sum(h["loss_moma"] for h in logs[-5:]) / 5 < 0.9 * math.log(32 + 1)
    assert not any(torch.equal(a, b) for a, b in zip(head_before, moma.key_head.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, moma.teacher.parameters()))
