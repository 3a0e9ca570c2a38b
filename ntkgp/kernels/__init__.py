"""GPyTorch kernels."""

from ntkgp.kernels.ntk_kernel import NTKKernel

__all__ = ["NTKKernel"]
