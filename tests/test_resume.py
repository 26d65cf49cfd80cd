"""Resume is exact: 20 steps, a crash, then 20 resumed steps give the model of 40 straight steps, bit for bit.

"The model" is the whole MoMA state: student, key pathway (teacher, g_T, A_k), queue, pointer and fill. The
data position resumes too: map-style data through the Trainer's sampler, streamed data through the stream.
Augmentation is seeded per image (see `PatchCollator`), so the resumed run also draws the same crops.
"""

import pytest
import torch
from conftest import make_trainer
from transformers import TrainerCallback


class _Crash(TrainerCallback):
    """Kill the run once `at_step` steps are done, after their checkpoint, losing everything in memory."""

    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def _state(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.distillation_model.state_dict().items()}


def _assert_bit_identical(resumed, straight):
    assert resumed.keys() == straight.keys()
    different = [name for name in straight if not torch.equal(resumed[name], straight[name])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"


@pytest.mark.parametrize("streaming, teacher", [(False, "same"), (True, "vit")], ids=["map-momentum", "stream-frozen"])
@pytest.mark.slow
def test_resuming_from_step_20_gives_the_straight_40_step_model(small_moma, nct_mini_dir, tmp_path, streaming,
                                                                 teacher):
    settings = dict(streaming=streaming, teacher=teacher, max_steps=40, save_steps=20, logging_steps=5)
    straight = make_trainer(small_moma, nct_mini_dir, tmp_path / "straight", **settings)
    straight.train()
    expected = _state(straight)
    if not streaming:  # 129 patches make 8 batches of 16: 40 steps cross epochs (new shuffles, augmentations)
        assert straight.state.epoch == 5.0

    first = make_trainer(small_moma, nct_mini_dir, tmp_path / "resumed", **settings)
    first.add_callback(_Crash(at_step=20))
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-20"]

    second = make_trainer(small_moma, nct_mini_dir, tmp_path / "resumed", **settings)
    second.train(resume_from_checkpoint=True)
    resumed = _state(second)

    assert second.state.global_step == 40
    queue = second.distillation_model.key_queue
    assert queue.queue_ptr.item() == 40 * 16 % queue.size and queue.queue_len.item() == queue.size
    _assert_bit_identical(resumed, expected)
    straight_losses = [h["loss"] for h in straight.state.log_history if "loss" in h and h["step"] > 20]
    resumed_losses = [h["loss"] for h in second.state.log_history if "loss" in h and h["step"] > 20]
    assert resumed_losses == straight_losses


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_the_command_line_continues_from_checkpoint_20_to_the_straight_runs_student(tmp_path, monkeypatch):
    import importlib.util
    import shutil

    from conftest import REPO
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)  # the demo config names its teacher and data relative to the repository
    spec = importlib.util.spec_from_file_location("distill", REPO / "examples" / "distill.py")
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    flags = ["--max_steps", "40", "--lr_scheduler_type", "constant", "--save_steps", "20", "--report_to", "none",
             "--per_device_train_batch_size", "8",
             "--disable_tqdm", "true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert distill.main(flags + ["--output_dir", str(straight)]) == 0
    # A run that stopped at step 20 left only its checkpoint behind.
    shutil.copytree(straight / "checkpoint-20", resumed / "checkpoint-20")
    assert distill.main(flags + ["--resume_from_checkpoint", str(resumed / "checkpoint-20"),
                                 "--output_dir", str(resumed)]) == 0
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_stream_trains_as_one_endless_sequence_of_reshuffled_epochs(nct_mini_dir):
    from moma_hf.data.loading import load_patch_dataset
    from moma_hf.data.streaming import EPOCH_KEY, EndlessStream

    examples = iter(EndlessStream(load_patch_dataset(str(nct_mini_dir), "train", streaming=True, seed=0)))
    seen = [next(examples) for _ in range(2 * 129 + 5)]
    assert [e[EPOCH_KEY] for e in seen] == [0] * 129 + [1] * 129 + [2] * 5
    first, second = ([e["image"]["path"] for e in seen[i * 129:(i + 1) * 129]] for i in (0, 1))
    assert len(set(first)) == 129 and sorted(first) == sorted(second)  # each epoch is the whole set once
    assert first != second  # in another order
