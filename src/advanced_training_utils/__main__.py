"""``python -m advanced_training_utils`` runs the ``advtrain`` command line."""

from .app.cli import main

raise SystemExit(main())
