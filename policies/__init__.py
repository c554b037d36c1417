"""sendguard's policies: one module per policy, listed in an explicit registry.

The registry is written out by hand on purpose: a policy exists when it is listed here,
a typo in the config is an error that names the known policies, and two policies can
never claim the same name.
"""

from __future__ import annotations

from policies.base import Policy
from policies.consent import ConsentPolicy
from policies.headers import RequiredHeadersPolicy
from policies.list_unsubscribe import ListUnsubscribePolicy
from policies.ratelimit import RateLimitPolicy
from policies.recipients import VisibleRecipientsPolicy
from policies.sender_domain import SenderDomainPolicy
from policies.unsubscribe import UnsubscribePolicy

__all__ = ("REGISTRY", "build_registry")


def build_registry(*classes: type[Policy]) -> dict[str, type[Policy]]:
    registry: dict[str, type[Policy]] = {}
    for cls in classes:
        if not cls.name:
            raise RuntimeError(f"policy class {cls.__qualname__} has no name")
        if cls.name in registry:
            raise RuntimeError(
                f"duplicate policy name {cls.name!r}: {cls.__qualname__} and {registry[cls.name].__qualname__}"
            )
        registry[cls.name] = cls
    return registry


REGISTRY: dict[str, type[Policy]] = build_registry(
    RequiredHeadersPolicy,
    SenderDomainPolicy,
    RateLimitPolicy,
    ConsentPolicy,
    UnsubscribePolicy,
    VisibleRecipientsPolicy,
    ListUnsubscribePolicy,
)
