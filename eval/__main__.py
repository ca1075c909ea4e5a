"""``python -m eval TASK --model PATH ...``"""

import sys

from .cli import main

sys.exit(main())
