import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines: no spin-waiting threads

# Triton kernels run on the CPU under the interpreter in CI; must be set before decoration.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
