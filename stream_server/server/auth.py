"""Who may open a stream: API keys and an Origin allowlist, checked before the WebSocket upgrade.

Pure functions over the HTTP request; the server turns a refusal into an HTTP 401/403 response.

Clients present a key in one of three ways:
- ``Authorization: Bearer KEY`` (servers, SDKs) or ``Authorization: Token KEY`` (Deepgram's SDKs);
- ``?token=KEY`` in the URL (browsers cannot set headers on a WebSocket);
- the subprotocol ``token.KEY`` next to ``granite-stream``:
  ``new WebSocket(url, ["granite-stream", "token." + KEY])``; the server answers ``granite-stream``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.typing import Subprotocol

SUBPROTOCOL = "granite-stream"
TOKEN_SUBPROTOCOL_PREFIX = "token."


@dataclass(frozen=True)
class SecuritySettings:
    """The ``security`` section of the server's settings, as given (paths and lists as text; empty: unset).

    Attributes:
        api_keys_file: file of accepted API keys, one per line (:func:`load_api_keys`).
        allowed_origins: comma-separated ``Origin`` values browsers may connect from (empty: any).
        certfile, keyfile: serve TLS (wss://, https://) with this certificate chain and key (the key
            defaults to the certfile).
    """

    api_keys_file: str = ""
    allowed_origins: str = ""
    certfile: str = ""
    keyfile: str = ""

    @property
    def cert_path(self) -> Path | None:
        """The certificate chain, or ``None``: no TLS."""
        return Path(self.certfile) if self.certfile else None

    @property
    def key_path(self) -> Path | None:
        """The private key: ``keyfile``, else the certfile (a PEM holding both); ``None`` without TLS."""
        return Path(self.keyfile) if self.keyfile else self.cert_path

    def access_policy(self, env_value: str | None = None) -> AccessPolicy:
        """The policy these settings describe: keys from ``api_keys_file`` and ``$GRANITE_STREAM_API_KEYS``
        (or ``env_value``), the origin list split.

        Raises:
            OSError, ValueError: an unreadable key file or a malformed key (:func:`load_api_keys`).
        """
        return AccessPolicy(
            api_keys=load_api_keys(env_value, Path(self.api_keys_file) if self.api_keys_file else None),
            allowed_origins=frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip()),
        )


@dataclass(frozen=True)
class AccessPolicy:
    """What a request must satisfy.

    Attributes:
        api_keys: accepted keys; empty means no authentication (the default, for local use).
        allowed_origins: accepted ``Origin`` header values for browsers; empty allows any. Requests
            without an ``Origin`` header (non-browser clients) are not affected by this list.
    """

    api_keys: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()


def load_api_keys(env_value: str | None = None, key_file: Path | None = None) -> frozenset[str]:
    """Collect API keys from a comma-separated environment value and/or a file (one key per line, ``#`` comments).

    Raises:
        FileNotFoundError: ``key_file`` does not exist.
        ValueError: a key shorter than 16 characters (too easy to guess) or with whitespace inside.
    """
    keys: list[str] = []
    if env_value is None:
        env_value = os.environ.get("GRANITE_STREAM_API_KEYS", "")
    keys += [k.strip() for k in env_value.split(",") if k.strip()]
    if key_file is not None:
        for line in Path(key_file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
    for key in keys:
        if len(key) < 16 or any(ch.isspace() for ch in key):
            raise ValueError("API keys must be at least 16 characters without whitespace")
    return frozenset(keys)


def presented_key(path: str, headers) -> str | None:
    """The key a request presents, from the header, the query string or the subprotocol list."""
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "token") and credentials.strip():
        # "Token" is what Deepgram's SDKs send; "Bearer" everything else.
        return credentials.strip()
    query = parse_qs(urlsplit(path).query)
    if query.get("token"):
        return query["token"][0]
    for value in headers.get_all("Sec-WebSocket-Protocol") if hasattr(headers, "get_all") else []:
        for item in value.split(","):
            item = item.strip()
            if item.startswith(TOKEN_SUBPROTOCOL_PREFIX):
                return item[len(TOKEN_SUBPROTOCOL_PREFIX):]
    return None


def check_access(policy: AccessPolicy, path: str, headers) -> tuple[int, str] | None:
    """Decide whether a WebSocket upgrade may proceed.

    Returns:
        ``None`` to accept, or ``(http_status, reason)``: 401 when no key was presented, 403 for a
        wrong key or a browser Origin that is not allowed.
    """
    origin = headers.get("Origin")
    if policy.allowed_origins and origin is not None and origin not in policy.allowed_origins:
        return 403, f"origin {origin[:100]!r} is not allowed"
    if not policy.api_keys:
        return None
    key = presented_key(path, headers)
    if key is None:
        return 401, "an API key is required: send 'Authorization: Bearer KEY', ?token=KEY or subprotocol token.KEY"
    # Constant-time comparison against every key, so timing does not reveal a prefix.
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in policy.api_keys):
        return 403, "the API key is not valid"
    return None


def select_subprotocol(offered) -> Subprotocol | None:
    """Answer ``granite-stream`` when offered; a ``token.KEY`` entry is never echoed back."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None
