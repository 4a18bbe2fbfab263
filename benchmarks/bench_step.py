"""One MGPP step against torch.optim.AdamW on a BERT-base-shaped model: the package's
`python -m mgpp_kernels bench` (it needs nothing beyond the package, so it lives there). Run with
--help for the options."""
import os
import sys

# Run as a script, this folder is on sys.path, not the checkout: measure the mgpp_kernels beside it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgpp_kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
