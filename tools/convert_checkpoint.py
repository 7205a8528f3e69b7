"""Operator wrapper over `keye-convert` (init / inspect Keye-VL-1.5 Hugging Face checkpoints)."""

import sys

from keye_train.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
