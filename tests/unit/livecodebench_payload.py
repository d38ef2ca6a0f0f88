"""LiveCodeBench's compressed ``private_test_cases`` payload, built the way the real release is."""

import base64
import json
import pickle
import zlib


def encode_private_test_cases(tests: list[dict]) -> str:
    """``base64(zlib(pickle(json string)))``: what ``megacredit.data.livecodebench`` decodes."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")
