"""One MGPP step against torch.optim.AdamW on a BERT-base-shaped model; same as
`python -m mgpp_kernels bench`. Run with --help for the options."""
import sys

from mgpp_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main())
