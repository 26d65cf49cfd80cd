"""Pre-emption under the real `accelerate launch`: whichever process gets SIGTERM, the job ends with a complete
checkpoint on every rank and exit code 143 (moma_hf/launcher.py, README "Interrupted runs")."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from conftest import REPO, launch_command, launch_env

from moma_hf.training.fault_tolerance import is_complete_checkpoint

PREEMPTED = 143
TINY_RUN = ["--student_model_name_or_path", "test_resnet", "--image_size", "112", "--per_device_train_batch_size",
            "8", "--max_steps", "500", "--save_steps", "1000", "--logging_steps", "1", "--disable_tqdm", "true",
            "--report_to", "none", "--dataloader_num_workers", "0"]


def single_process_command(*args) -> list[str]:
    """`accelerate launch` with one CPU process: accelerate's simple launcher (a plain subprocess)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--mixed_precision",
            "no", "--dynamo_backend", "no", "examples/distill.py", *args]


class Job:
    """A launched job in its own process group, its output collected by a thread (so no pipe ever fills)."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(command, cwd=REPO, env={**launch_env(), "PYTHONUNBUFFERED": "1"},
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        self.trained = threading.Event()
        self.collector = threading.Thread(target=self._collect, daemon=True)
        self.collector.start()

    def _collect(self):
        for line in self.process.stdout:
            self.lines.append(line)
            if "'loss'" in line:  # a step is logged: the processes are past setup and inside the training loop
                self.trained.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def workers(self, count: int) -> list[psutil.Process]:
        """The launcher's children that run the training script (one per rank)."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        workers = [p for p in children if "examples/distill.py" in " ".join(p.cmdline())]
        assert len(workers) == count, [p.cmdline() for p in children]
        return workers

    def wait_for_training(self):
        assert self.trained.wait(timeout=400), self.output[-4000:]


def assert_one_complete_checkpoint(out: Path, ranks: int, output: str):
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-4000:]
    checkpoint = checkpoints[0]
    names = {p.name for p in checkpoint.iterdir()}
    rng_files = {"rng_state.pth"} if ranks == 1 else {f"rng_state_{rank}.pth" for rank in range(ranks)}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} | rng_files <= names, names
    assert is_complete_checkpoint(checkpoint)  # its trainer_state.json, written last, is in
    assert not (out / "model.safetensors").exists()  # an unfinished student is never exported as final
    assert f"--resume_from_checkpoint {checkpoint}" in output


def preempt(job: Job, target: str, ranks: int):
    """Send the signal of case `target` once training runs: to rank 0, to the launcher, or to the whole group."""
    job.wait_for_training()
    workers = job.workers(ranks)
    if target == "worker":
        workers[0].send_signal(signal.SIGTERM)
    elif target == "launcher":
        os.kill(job.process.pid, signal.SIGTERM)
    elif target == "launcher-killed":
        os.kill(job.process.pid, signal.SIGKILL)
    else:
        os.killpg(job.process.pid, signal.SIGTERM)  # what SLURM and Kubernetes send
    return workers


def run_and_preempt(command: list[str], target: str, ranks: int) -> tuple[int, list[psutil.Process], Job]:
    job = Job(command)
    try:
        workers = preempt(job, target, ranks)
        code = job.process.wait(timeout=300)
        gone, alive = psutil.wait_procs(workers, timeout=120)  # no rank trains on as an orphan
        assert not alive, f"still running: {alive}\n{job.output[-4000:]}"
        job.collector.join(timeout=60)  # every process has exited: read their last lines (the resume command)
        return code, workers, job
    finally:
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGKILL)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", ["worker", "launcher", "group"])
@pytest.mark.slow
def test_one_process_preempted_through_any_process_leaves_a_checkpoint_and_exit_code_143(target, tmp_path):
    out = tmp_path / "out"
    code, _, job = run_and_preempt(single_process_command(*TINY_RUN, "--output_dir", out), target, ranks=1)
    assert code == PREEMPTED, job.output[-4000:]
    assert_one_complete_checkpoint(out, 1, job.output)


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_a_killed_launcher_does_not_orphan_its_worker(tmp_path):
    """SIGKILL leaves the launcher no chance to stop its child: the child notices its parent died and checkpoints."""
    out = tmp_path / "out"
    code, _, job = run_and_preempt(single_process_command(*TINY_RUN, "--output_dir", out), "launcher-killed", 1)
    assert code == -signal.SIGKILL
    assert_one_complete_checkpoint(out, 1, job.output)


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
@pytest.mark.parametrize("target", ["worker", "launcher", "group"])
@pytest.mark.slow
def test_two_processes_preempted_through_any_process_checkpoint_every_rank_and_exit_143(target, tmp_path):
    out = tmp_path / "out"
    command = launch_command("examples/distill.py", *TINY_RUN, "--output_dir", out)
    code, _, job = run_and_preempt(command, target, ranks=2)
    assert code == PREEMPTED, job.output[-4000:]
    assert_one_complete_checkpoint(out, 2, job.output)
