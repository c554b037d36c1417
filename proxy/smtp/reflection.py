"""A cheap ``dir()`` for the objects aiosmtpd reflects over on every connection.

aiosmtpd's ``SMTP.__init__`` finds its command methods (``smtp_*``), AUTH mechanisms
(``auth_*``) and handler hooks (``handle_*``) with ``dir()`` and ``inspect.getmembers()`` of
the session and of the handler, once per connection. ``getmembers`` reads every attribute of
the object, properties included: about a tenth of the CPU a small relayed message costs.
Classes with this mixin list only the names aiosmtpd looks for, computed once per class, so
the same reflection finds the same methods for a few lookups. It also reads the signature
of the handler's ``handle_EHLO`` on every connection (to tell its old four-argument form
from the new one): the class keeps it computed, as ``__signature__``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

__all__ = ("ReflectedNames",)

#: The prefixes aiosmtpd looks for (aiosmtpd/smtp.py, ``SMTP.__init__``).
_PREFIXES = ("smtp_", "auth_", "handle_")


class ReflectedNames:
    """``dir()`` of an instance is its class's ``smtp_*``, ``auth_*`` and ``handle_*`` names."""

    _reflected_names: ClassVar[dict[type, list[str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ehlo = cls.__dict__.get("handle_EHLO")
        if inspect.isfunction(ehlo):
            # inspect.signature reads a function's __signature__ before working it out.
            ehlo.__signature__ = inspect.signature(ehlo)  # type: ignore[attr-defined]

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = ReflectedNames._reflected_names.get(cls)
        if names is None:
            names = sorted(name for name in dir(cls) if name.startswith(_PREFIXES))
            ReflectedNames._reflected_names[cls] = names
        return list(names)
