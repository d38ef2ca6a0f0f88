#!/usr/bin/env python
"""Convert a Hugging Face model folder into a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out CKPT_DIR --tp 2 --pp 1

Same as ``megacredit convert hf-to-mcore``; see megacredit/megatron/convert.py. The ``__main__``
guard is required: the converter spawns worker processes that re-import this file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from megacredit.megatron.convert import hf_to_mcore_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(hf_to_mcore_main())
