"""Everything in megacredit that imports Megatron-Core lives in this package."""

import warnings

import torch

if not torch.cuda.is_available():
    # On a CPU machine Transformer Engine and Apex are absent by design (they need CUDA);
    # Megatron-Core says so at every import. Keep the console readable; the fallbacks are the
    # plain-torch implementations megacredit is tested with.
    for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                     "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{_message}.*", category=UserWarning)
