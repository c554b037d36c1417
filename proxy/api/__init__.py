"""The consent API for CRMs and sign-up forms, and the webhooks that tell them what changed.

- ``config``: the ``api`` and ``webhooks`` config sections, ``sendguard api token``.
- ``state``: idempotency keys and the webhook outbox, in the consent store's database.
- ``server``: the aiohttp site; ``openapi``: its OpenAPI 3.1 document.
- ``webhooks``: the notifier that fills the outbox, the deliverer that empties it, signing.
"""
