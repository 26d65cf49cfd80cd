"""`--cache_teacher_features` in `moma-distill`: what the cache must match, finding a ready one, building it.

`main()` calls, in this order:

1. `facts = cache_facts(args, data_args, image_size)`: what the cached crops depend on besides the data;
2. `find_ready_cache(train_dataset, collator, args, facts)`: True when a complete cache for this very run is on
   disk, so the teacher's weights need not be loaded at all;
3. `train_dataset = cache_teacher_outputs(model, train_dataset, collator, args, facts)`: builds the cache when
   needed (every process computes its share) and makes `collator` read it.
"""

from __future__ import annotations

from pathlib import Path

from moma_hf.configuration_distillation import TeacherUpdate
from moma_hf.data.feature_cache import DEFAULT_DIR, attach_feature_cache


def cache_dir(args) -> Path:
    """The cache folder: `--teacher_feature_cache_dir`, else `OUTPUT_DIR/_teacher-feature-cache`."""
    return Path(args.teacher_feature_cache_dir or Path(args.output_dir) / DEFAULT_DIR)


def cache_facts(args, data_args, image_size: int) -> dict:
    """What the cached crops and outputs depend on besides the data itself, checked whenever the cache is reused."""
    return {"teacher": args.teacher_model_name_or_path, "teacher_revision": args.teacher_model_revision,
            "teacher_dtype": args.teacher_dtype, "image_size": image_size,
            "randaugment": data_args.randaugment, "stain_jitter": data_args.stain_jitter}


def find_ready_cache(train_dataset, collator, args, facts: dict) -> bool:
    """True when a complete cache that fits this run is on disk (then the teacher need not be loaded)."""
    return False


def cache_teacher_outputs(model, train_dataset, collator, args, facts: dict):
    """`--cache_teacher_features`: the training set with its `_row` column, and `collator` reading the cache."""
    if model.teacher is None or getattr(model, "teacher_update", TeacherUpdate.FROZEN) != TeacherUpdate.FROZEN:
        raise ValueError("--cache_teacher_features needs a frozen teacher: a momentum teacher changes every step, "
                         "and `ce` has none. Use --teacher_update frozen.")
    model.teacher.eval().to(args.device)
    with args.main_process_first(desc="teacher-feature cache"):
        return attach_feature_cache(
            train_dataset, collator, model.teacher_outputs, views=args.cache_views, path=cache_dir(args),
            facts=facts, batch_size=args.per_device_train_batch_size, device=args.device,
            progress=not args.disable_tqdm,
        )
