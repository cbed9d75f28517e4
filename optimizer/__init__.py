"""Allocation optimizer: utility curves, allocators (exact, LP, boolean, baselines), bandwidth estimators."""
