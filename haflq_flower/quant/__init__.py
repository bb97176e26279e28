"""Quantization: the uplink channel model and the bit-packed payload codec."""
