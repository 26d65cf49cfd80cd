"""Evaluation with its own collator: the part of the Trainer that both moma-hf trainers change the same way."""

from __future__ import annotations

from torch.utils.data import DataLoader


class EvalCollatorMixin:
    """Evaluation DataLoaders built with `self.eval_data_collator` (falling back to the training collator), which
    keep every example, while training uses the augmenting collator and drops short batches.

    Put it before `Trainer` in the bases and set `eval_data_collator` in `__init__`. Evaluation during training
    (`--eval_strategy steps|epoch`), `evaluate()` and `predict()` all go through it.
    """

    eval_data_collator = None

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """The evaluation DataLoader of `eval_dataset` (a dataset, a key of a dict `self.eval_dataset`, or None for
        `self.eval_dataset`), built with `eval_data_collator` and keeping every example."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        return self.evaluation_dataloader(self.eval_dataset if eval_dataset is None else eval_dataset, key)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        """The DataLoader of `test_dataset`, built as for evaluation (`eval_data_collator`, every example)."""
        return self.evaluation_dataloader(test_dataset)

    def evaluation_dataloader(self, dataset, key: str | None = None) -> DataLoader:
        """A DataLoader over `dataset` in order, batched by `eval_batch_size` with `eval_data_collator` (or the
        training collator when there is none), with the last, short batch kept, prepared for this process.

        With persistent workers, the loader of `key` is built once and reused, as the Trainer does, so that each
        evaluation does not start a new set of workers.
        """
        loaders = self.__dict__.setdefault("_eval_loaders", {})  # only with persistent workers, as the Trainer
        if key is not None and key in loaders:
            return loaders[key]
        args = self.args
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=args.eval_batch_size, collate_fn=self.eval_data_collator or self.data_collator,
            drop_last=False,  # every example is scored (training drops short batches: dataloader_drop_last)
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers, prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context, in_order=args.dataloader_in_order,
        ))
        if key is not None and args.dataloader_persistent_workers:
            loaders[key] = loader
        return loader
