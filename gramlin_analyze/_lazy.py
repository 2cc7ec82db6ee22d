"""Names a package loads on first use, so importing it stays cheap (start-up of the CLI)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def lazy_attributes(
    package: str, names: dict[str, str], public: list[str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    ``names`` maps a public name to ``"module"`` (the attribute of that name in it),
    ``"module:attr"``, or ``"module:"`` (the module itself); a module starting
    with ``.`` is relative to ``package``. A loaded value is kept in ``namespace``.
    """

    def __getattr__(name: str) -> Any:
        try:
            where = names[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        import importlib

        module, _, attr = where.partition(":")
        mod = importlib.import_module(module, package)
        value = mod if (":" in where and not attr) else getattr(mod, attr or name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
