"""What the test sites' sitecustomize.py share: a module changed as soon as it is imported, in
whichever process of the site imports it (tests/deployment.py puts this folder on their PYTHONPATH)."""

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType


class _Patching(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, install: Callable[[ModuleType], None]):
        self.target, self.install = target, install

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.install(module)

        spec.loader.exec_module = exec_module
        return spec


def patch_on_import(target: str, install: Callable[[ModuleType], None]) -> None:
    """Call `install` with the module `target` once it is imported."""
    sys.meta_path.insert(0, _Patching(target, install))
