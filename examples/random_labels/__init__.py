"""The paper's random-label experiment on digits: ``python -m examples.random_labels``."""
