"""``python -m advanced_training_utils`` runs the ``advtrain`` command line."""

from .cli import main

raise SystemExit(main())
