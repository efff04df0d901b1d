"""Runs: ids, manifests, metrics logs, listing and comparison."""
