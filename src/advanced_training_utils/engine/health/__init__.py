"""The run's health: the bad-step guard (``guard``) and divergence recovery (``recovery``)."""
