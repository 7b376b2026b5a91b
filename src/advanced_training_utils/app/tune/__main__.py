"""``python -m advanced_training_utils.app.tune -- ...``: one trial's process (:mod:`.trial`)."""

import sys

from .trial import main

sys.exit(main())
