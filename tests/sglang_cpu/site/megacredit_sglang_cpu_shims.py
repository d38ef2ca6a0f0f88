"""TEST-ONLY import hook of the SGLang CPU test environment (.venv-sglang; the Makefile puts
``tests/sglang_cpu/site`` on its path and imports this module from a ``.pth`` file).

SGLang 0.5.23 imports ``torchvision`` at module load (multimodal configs and processors). The
only torchvision wheels PyPI has for torch 2.13 are CUDA builds whose compiled ops (``_C.so``)
cannot load beside the CPU torch. torchvision then runs without its ops (every registration it
makes is guarded by ``torchvision.extension._has_ops()``) except two unguarded
``torch.library.register_fake("torchvision::nms" / "torchvision::qnms")`` calls in
``torchvision/_meta_registrations.py``, which raise ``operator torchvision::nms does not exist``
and make ``import torchvision`` fail. This hook, when torchvision's ops are absent, gives
``torchvision._meta_registrations`` an empty module instead: what that file registers only
describes the missing ops (shape functions for torch.compile), so nothing else changes. No file
in site-packages is edited; with a torchvision whose ops load, the hook does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "torchvision._meta_registrations"


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        module.__doc__ = "emptied by megacredit_sglang_cpu_shims: torchvision's ops are absent"


class _SkipMetaRegistrationsWithoutOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        extension = sys.modules.get("torchvision.extension")
        if extension is None or extension._has_ops():
            return None  # the ops loaded: torchvision's own file runs
        return importlib.machinery.ModuleSpec(fullname, _EmptyModuleLoader())


def install() -> None:
    if not any(isinstance(finder, _SkipMetaRegistrationsWithoutOps) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SkipMetaRegistrationsWithoutOps())


install()
