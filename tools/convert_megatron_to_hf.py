#!/usr/bin/env python
"""Convert a Megatron-Core distributed checkpoint into a Hugging Face model folder.

    python tools/convert_megatron_to_hf.py --mcore-dir CKPT_DIR --out HF_DIR [--tp 1 --pp 1]

Same as ``megacredit convert mcore-to-hf``; see megacredit/megatron/convert.py. The ``__main__``
guard is required: the converter spawns worker processes that re-import this file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from megacredit.megatron.convert import mcore_to_hf_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(mcore_to_hf_main())
