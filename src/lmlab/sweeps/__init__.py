"""Sweeps: experiments as variants x grid points x seeds, run locally or on Ray, reported with
intervals and tests rather than single numbers."""
