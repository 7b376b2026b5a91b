"""The run's health: the bad-step guard (``guard``), divergence recovery (``recovery``) and the
divergence monitor that owns both (``monitor``): the run talks to the monitor only."""
