"""train-pytorch-model: the open successor of Azure ML designer's "Train PyTorch Model".

The flow, one module per step:
component.yaml -> cli -> image_directory / model_directory (read) -> models (build)
-> data + train (fit) -> model_directory + pyfunc (write) -> tracking (log, register).
"""

__version__ = "1.0.0"
