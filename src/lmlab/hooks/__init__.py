"""The experiment surface: hook points and the forward, backward, update and aux-loss hooks."""
