"""Evaluation: quality against budget or compression ratio (evaluate), and RULER's tasks (ruler)."""
