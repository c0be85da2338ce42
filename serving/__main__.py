"""`python -m serving [serve options]`: what `finetune serve` runs."""

import sys

from serving.cli import main

sys.exit(main())
