"""Benchmarks: kernel microbenchmarks, training-step throughput (`sddit bench step`), the
profiler (`sddit profile`), the steps/s-vs-FID chart (`sddit bench chart`) and the GPU
device check.

Layer: sdkernels <- model <- data <- train, metrics <- **bench** <- sddit. It may import
every layer below it (it times the training loop's own step and scores with metrics);
only the `sddit` command line imports it.
"""
