"""Attention, sampling and other compute kernels; C++ ones are built lazily (see build.py)."""
