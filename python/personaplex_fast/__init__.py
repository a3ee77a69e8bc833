"""Real-time full-duplex PersonaPlex / Moshi on MLX with fused kernels."""

__version__ = "0.1.0"
