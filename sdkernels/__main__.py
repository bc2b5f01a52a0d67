"""`python -m sdkernels`: lower every kernel for sm_80 and sm_90 and print the resources
each would use (JSON lines). Run it without TRITON_INTERPRET."""

from sdkernels._lowering import main

main()
