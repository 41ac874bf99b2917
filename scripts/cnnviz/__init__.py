"""cnnviz: see what convolutional image classifiers look at, for any ONNX model.

Run time needs ONNX Runtime and numpy only; torch is imported by the export step alone.
"""

__version__ = "0.1.0"
