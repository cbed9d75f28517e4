"""Allocation optimizer: utility curves, allocators (exact, LP, boolean, baselines), bandwidth estimators.

curves.py      profile tables (CSV/Parquet) and utility curves (the staircase of non-dominated options)
problem.py     shared rules: problem checks, the budget tolerance, building an Allocation
exact.py       the exact multiple-choice knapsack solver (frontier DP with LP bounds)
convex.py      the same problem in cvxpy: LP relaxation and boolean program (reference, extensions)
allocators.py  the Allocator protocol, baselines, and the ALLOCATORS registry / get_allocator()
bandwidth.py   throughput estimators and the quantile forecaster
quantile.py    QuantilePlanner: plan at the forecast quantile that maximises expected utility
"""
