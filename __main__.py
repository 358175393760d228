"""``python -m comfyui_diffsr COMMAND ...``"""

import sys

from .cli.main import main

sys.exit(main())
