#!/usr/bin/env python
"""`redi-verify-parity` from a checkout: `python checkpoint_tools/verify_parity.py --help`.

The logic is in redi_megatron.convert.verify_parity; this only puts the checkout on sys.path
(the arguments are parsed first, in redi_megatron/convert/cli.py, before torch is imported)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from redi_megatron.convert.cli import verify_parity as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
