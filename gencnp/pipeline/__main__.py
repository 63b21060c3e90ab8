"""``python -m gencnp.pipeline --config FILE``: run the main job (``gencnp.pipeline.run.main``)."""

import sys

from gencnp.pipeline.run import main

sys.exit(main())
