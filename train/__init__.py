"""Training: config, the schedule (each step's lr, EMA decay, teacher momentum and loss
inputs), the loop and its step, the sampling EMA, checkpoints and resume, signals,
distributed wrapping, logging and sampling grids.

Layer: sdkernels <- model <- data (train.data) <- **train** (beside metrics) <- bench <- sddit.
It imports model, sdkernels and train.data; never metrics, bench or sddit. train.data is a
layer of its own below it (see train/data/__init__.py): nothing in train.data imports the
rest of train.
"""
