#!/usr/bin/env python
"""`redi-hf-to-megatron` from a checkout: `python checkpoint_tools/hf_to_megatron.py --help`.

The logic is in redi_megatron.convert.hf_to_megatron; this only puts the checkout on sys.path
(the arguments are parsed first, in redi_megatron/convert/cli.py, before torch is imported)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from redi_megatron.convert.cli import hf_to_megatron as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
