"""The jobs a user runs, each a module with a `main(argv=None)` and a console script:

- `moma-distill` (`distill`): distil a teacher into a student, evaluate it, write its card, push it;
- `moma-train-teacher` (`train_teacher`): train a supervised teacher classifier;
- `moma-evaluate` (`evaluate`): score any image classifier on a split of a labeled patch dataset;
- `moma-compare` (`compare`): compare distillation methods on one task, paired by seed.

Each also runs as `python -m moma_hf.commands.NAME` or `accelerate launch -m moma_hf.commands.NAME`.
"""
