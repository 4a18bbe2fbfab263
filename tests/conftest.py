import os

# The triton backend's tests run its kernels on the CPU through the Triton interpreter; this must
# be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
