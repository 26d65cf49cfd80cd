"""Train a supervised teacher image classifier (the `moma-train-teacher` command).

    python examples/train_teacher.py --config examples/configs/demo_teacher.yaml --overwrite_output_dir

See `moma_hf.commands.train_teacher`, where everything happens.
"""

import sys

from moma_hf.commands.train_teacher import main

if __name__ == "__main__":
    sys.exit(main())
