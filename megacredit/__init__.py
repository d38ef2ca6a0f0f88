"""megacredit: on-policy self-distillation RL on Megatron-Core."""
__version__ = "0.1.0"
