"""``megacredit plan``: the memory of a run's layout per GPU, counted from the config (no Megatron, no GPU)."""
