"""Weight quantization: the packed formats, round-to-nearest and calibrated quantizers, quality evaluation."""
