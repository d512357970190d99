"""vlmedge: train, compress, export and benchmark vision-language models (dual encoders, generative models,\ncross-attention matching models) for edge devices.

Importing the package is cheap: torch, transformers and onnxruntime are imported inside the functions that need them.
"""

__version__ = "0.3.0"
