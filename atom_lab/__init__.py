"""atom-lab: low-bit weight-activation quantization of LLMs (Atom reproduced and extended)."""
__version__ = "0.1.0"
