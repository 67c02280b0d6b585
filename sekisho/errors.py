"""The root of Sekisho's own exceptions.

Every failure Sekisho raises on purpose — a refused query, an invalid policy, an audit
trail that cannot be written, a malformed request — is a :class:`SekishoError`, so a
caller can tell an explained outcome (``except SekishoError``) from a bug (anything
else), and a service can log the latter with its traceback before it answers. It sits
in the lowest layer, importing nothing, so that every module may use it.
"""

from __future__ import annotations


class SekishoError(Exception):
    """A failure Sekisho raises on purpose, with a message meant for the person affected."""
