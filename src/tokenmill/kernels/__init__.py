"""Native CPU kernels (C++ through ctypes) with plain-PyTorch fallbacks; see build.py for why ctypes."""
