"""URLs in messages: hide passwords, wherever the URL carries them.

Every URL the library prints (errors, log lines, ``repr()`` of its settings)
goes through :func:`redact`: a password in the user part
(``redis://:s3cret@host``) or in the query (``?password=s3cret``) becomes
``***``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Query parameters whose values are secrets (redis-py reads ``?password=``).
SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "token", "secret"})


def redact(url: str) -> str:
    """``url`` with its password (in the user part or the query) hidden, for messages and reprs."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: show nothing that could be a secret
        return "<malformed URL>"
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in pairs])
        query = query.replace("%2A%2A%2A", "***")
    return urlunsplit(parts._replace(netloc=netloc, query=query))
