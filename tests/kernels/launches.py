"""Recording which launchers a call goes through, for tests that check which kernels run."""

from types import ModuleType
from typing import Sequence


def record_launches(monkeypatch, module: ModuleType, names: Sequence[str]) -> list[str]:
    """Wrap ``module``'s launchers ``names`` (objects launched as ``kernel[grid](...)``) so
    that each launch appends its name, in order, to the list returned."""
    launched: list[str] = []
    for name in names:
        kernel = getattr(module, name)

        class Spy:
            def __getitem__(self, grid, name=name, kernel=kernel):
                launched.append(name)
                return kernel[grid]

        monkeypatch.setattr(module, name, Spy())
    return launched
