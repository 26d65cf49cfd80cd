"""Compare distillation methods on one scenario (the `moma-compare` command).

    python benchmarks/compare_methods.py --config examples/configs/scenario_same_task.yaml

See `moma_hf.commands.compare`, where everything happens.
"""

import sys

from moma_hf.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
