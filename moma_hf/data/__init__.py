"""Data in: labelled and unlabelled patch datasets, transforms, the collator, streams and the teacher-feature cache."""
