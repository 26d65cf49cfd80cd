"""Worker for ``tests/test_bad_input.py::test_the_end_of_run_limit_sums_every_process``.

Run under ``accelerate launch --multi_gpu --num_processes 2``. Each rank collates 10 real patches through its own
:class:`moma_hf.data.PatchCollator`; rank 1 has one unreadable file among them (10% of its images, 5% of the
run's). It then ends training as the Trainer does, through
:class:`moma_hf.training.bad_image_limit.BadImageLimitCallback`,
and writes to ``<out>/rank<r>.json`` whether the callback raised, and its message.
"""
import argparse
import json
import warnings
from pathlib import Path

from accelerate import Accelerator

from moma_hf.data.collator import BadImageWarning, PatchCollator
from moma_hf.data.transforms import build_eval_transform
from moma_hf.training.bad_image_limit import BadImageLimitCallback


def main():
    """Collate this rank's share, end the run, record the verdict."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max_bad_fraction", type=float, required=True)
    args = parser.parse_args()
    accelerator = Accelerator()  # as the Trainer does: sets up the process group (gloo on CPU)
    rank = accelerator.process_index
    files = sorted(Path(args.data).glob("*/*.jpg"))[rank * 10 : rank * 10 + 10]
    examples = [{"image": {"path": str(f), "bytes": None}, "label": 0} for f in files]
    if rank == 1:
        examples[0] = {"image": {"path": "broken.jpg", "bytes": files[0].read_bytes()[:200]}, "label": 0}
    collator = PatchCollator(build_eval_transform(32), ([0.5] * 3, [0.5] * 3), max_bad_fraction=args.max_bad_fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        collator(examples[:5])
        collator(examples[5:])
    verdict = {"rank": rank, "num_bad": collator.num_bad, "error": None}
    try:
        BadImageLimitCallback(collator).on_train_end(None, None, None)
    except ValueError as error:
        verdict["error"] = str(error)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(verdict))
    # Leave the process group together: a rank that exits while gloo's threads still run can abort with
    # "terminate called without an active exception" (seen once in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
