"""The paper's Fig. 7 offline: the final Gram matrix against the recorded VCS sum, the AGOP
and the checkpoint trapezoid estimate (``python -m examples.fig7``)."""
