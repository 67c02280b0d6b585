"""Sekisho (関所): a secure analysis environment for municipal personal data.

Data flows one way: source export -> abstraction (``sekisho.ingest``) -> store
(``sekisho.store``) -> guard (``sekisho.guard``) -> service (``sekisho.services``)
-> ibis client (``sekisho.client``) / reports (``sekisho.reports``).
"""

__version__ = "0.1.0"
