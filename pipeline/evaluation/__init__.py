"""Evaluation on verifiable tasks: avg@k and pass@k with bootstrap intervals, resumable.

``tasks`` (registry of problem sets and graders), ``metrics`` (pure
formulas), ``runner`` (the generate-grade-append loop and its resume).
"""
