"""Sekisho's JupyterHub managed services.

Each service is a small tornado application run by the hub as the ``sekisho``
service account (``python -m sekisho.services.<name>``):

* ``guard``   — the query guard over HTTP, used by analysts' kernels;
* ``audit``   — the audit review pages for admins (``sekisho.services.audit_review``);
* ``reports`` — published reports for managers.

They share ``sekisho.services.hubauth``: HubOAuth login, explicit scope checks, the
mapping from the hub user to the person's Sekisho role, and every 401/403 on record
(``sekisho.audit.DenialLog``: aggregated per source and minute). The guard service is
split into ``guard`` (endpoints, service), ``guard_handlers``, ``guard_pool`` and
``guard_wire``.
"""
