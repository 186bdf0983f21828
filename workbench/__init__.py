"""FlexQuant Workbench: build, serve, watch and compare multi-variant quantized checkpoints."""

__version__ = "0.1.0"
