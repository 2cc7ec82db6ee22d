import os

# Keras reads its backend at import time; the test suite uses the installed torch.
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
