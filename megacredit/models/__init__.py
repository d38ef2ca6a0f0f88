"""Model helpers: tiny random Hugging Face configs for tests and the real SmolLM2 checkpoint.

Imported lazily by submodule (``megacredit.models.tiny``, ``megacredit.models.smollm2``) so
that importing the package stays cheap.
"""
