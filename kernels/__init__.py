"""Triton kernels of subkern, installed as ``subkern.kernels`` (the folder ``kernels/``).

:mod:`subkern.kernels.hamming`: Hamming distances and fused exact Hamming top-k. Importing needs
``triton``; the kernels run compiled on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported).
"""
