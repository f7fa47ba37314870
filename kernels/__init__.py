"""Pallas attention kernels, importable as `jaxpd.kernels` (never as a bare `kernels`)."""
