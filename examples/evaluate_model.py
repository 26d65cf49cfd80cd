"""Evaluate an image classifier on a split of a labeled patch dataset (the `moma-evaluate` command).

    python examples/evaluate_model.py --model_name_or_path outputs/demo --data_dir examples/demo_data \
        --split validation --output_dir outputs/demo-eval

See `moma_hf.commands.evaluate`, where everything happens. (Not named evaluate.py: a script of that name would
shadow the `evaluate` library for every script in this folder.)
"""

import sys

from moma_hf.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
