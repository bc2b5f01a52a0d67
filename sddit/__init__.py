"""The `sddit` command line: the top layer, which assembles every command.

    sddit train | sample | prepare-latents | eval | demo | bench | profile

It may import every other layer (sdkernels <- model <- data <- train, metrics <- bench <-
sddit); nothing imports it. `python -m sddit ...` is the same program as `sddit ...`.
"""
