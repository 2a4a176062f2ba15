"""Triton GPU kernels for fastpref, installed as ``fastpref.kernels``.

Launchers only: allocation, grid choice and the ``@triton.jit`` kernels. Autograd and
dispatch live in :mod:`fastpref.ops`. Verified on the CPU under ``TRITON_INTERPRET=1``.
"""
