"""Training: config, the loop and its step, EMA and teacher momentum, checkpoints and resume,
signals, distributed wrapping, logging and sampling grids.

Layer: sdkernels <- model <- data (train.data) <- **train** (beside metrics) <- bench <- sddit.
It imports model, sdkernels and train.data; never metrics, bench or sddit. train.data is a
layer of its own below it (see train/data/__init__.py): nothing in train.data imports the
rest of train.
"""
