"""The triton backend: the MGPP step as Triton kernels (kernels.py) and their launcher (backend.py)."""
from .backend import BACKEND

__all__ = ["BACKEND"]
