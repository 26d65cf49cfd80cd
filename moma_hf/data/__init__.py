"""Data in: labeled and unlabeled patch datasets, transforms, the collator, streams and the teacher-feature cache.

The public data API is exported here; the modules hold one step each:

- `sources`: read a Hub id, an image folder, parquet or webdataset files as they are;
- `loading`: the labeled ``image``/``label`` datasets, and sharing them across processes;
- `unlabeled`: unlabeled patches (label -1), and mixing them with labeled ones;
- `transforms`: augmentation, evaluation resizing and normalisation;
- `collator`: decode, augment and normalise a batch, surviving corrupt files;
- `streaming`: a stream as one endless epoch, so resuming finds its place;
- `feature_cache`: a frozen teacher's outputs, computed once: the format and lookup;
- `feature_cache_build`: the caching pass, shared by every process and resumable;
- `arguments`: the data flags, and the datasets and collators they describe.
"""

from .arguments import DataArguments, PatchSourceArguments, build_collators, load_datasets
from .collator import (
    UNREADABLE,
    BadImageWarning,
    PatchCollator,
    TooManyBadImagesError,
    check_bad_fraction,
    example_key,
)
from .feature_cache import (
    TeacherFeatureCache,
    add_row_index,
    attach_feature_cache,
    dataset_fingerprint,
)
from .feature_cache_build import BuildSettings, CacheBuildInterrupted, build_feature_cache
from .loading import check_local_source, label_names, load_patch_dataset, shard_for_process
from .sources import IMAGE_EXTENSIONS, is_image_file, looks_like_local_path
from .streaming import EndlessStream
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
    load_rgb_image,
    normalization_from_processor,
)
from .unlabeled import UNLABELED, load_unlabeled_patches, mix_labeled_and_unlabeled

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "UNLABELED",
    "UNREADABLE",
    "BadImageWarning",
    "BuildSettings",
    "CacheBuildInterrupted",
    "DataArguments",
    "EndlessStream",
    "PatchCollator",
    "PatchSourceArguments",
    "TeacherFeatureCache",
    "TooManyBadImagesError",
    "add_row_index",
    "attach_feature_cache",
    "build_collators",
    "build_eval_transform",
    "build_feature_cache",
    "build_train_transform",
    "check_bad_fraction",
    "check_local_source",
    "dataset_fingerprint",
    "example_key",
    "is_image_file",
    "label_names",
    "load_datasets",
    "load_patch_dataset",
    "load_rgb_image",
    "load_unlabeled_patches",
    "looks_like_local_path",
    "mix_labeled_and_unlabeled",
    "normalization_from_processor",
    "shard_for_process",
]
