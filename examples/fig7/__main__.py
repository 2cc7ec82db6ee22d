"""``python -m examples.fig7 [--out DIR] [--steps N] [--every K]``."""

from examples.fig7.run import main

main()
