"""One generic name -> factory registry, shared by targets and anything else users extend."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class Registry:
    """Maps names to factories.

    Example:
        >>> targets = Registry("target")
        >>> @targets.register("tiny")
        ... def tiny(num_classes=10): ...
        >>> targets.create("tiny", num_classes=3)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._factories and self._factories[key] is not fn:
                raise KeyError(f"{self.kind} '{key}' is already registered; pick another name.")
            self._factories[key] = fn
            return fn

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} '{name}'.{hint} Known {self.kind}s: {', '.join(self.names())}. "
                f"Register your own with register_{self.kind}('{name}')."
            )
        return self._factories[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)
