"""The main job: distil a teacher into a small student (the `moma-distill` command, with the bundled demo as
its default).

    accelerate launch examples/distill.py                          # the bundled demo, offline
    accelerate launch examples/distill.py --config my_run.yaml     # YAML defaults, flags override

Everything happens in `moma_hf.commands.distill`; this script only adds the demo defaults
(`configs/demo.yaml`), used when no `--config` and no data flag is given.
"""

import sys
from pathlib import Path

from moma_hf.commands import distill

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    """`moma_hf.commands.distill.main` with the bundled demo as the default configuration."""
    return distill.main(argv, default_config=DEMO_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
