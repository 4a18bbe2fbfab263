"""The kernel microbenchmarks against every peer, with plots; same as
`python -m mgpp_kernels bench-suite`. Run with --help for the options."""
import sys

from mgpp_kernels.bench_suite import main

if __name__ == "__main__":
    sys.exit(main())
