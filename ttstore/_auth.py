"""Bearer-token auth for the HTTP servers: the tokens file, principals, and their scopes.

The tokens file (``--tokens-file PATH`` or ``TIMETRAVEL_TOKENS_FILE``) has one token a line::

    # TOKEN            SCOPE[,SCOPE]   [NAME]
    s3cr3t-ingest-1    write           checkout-service
    s3cr3t-reader      read            notebooks
    s3cr3t-admin       read,write      admin

Scopes are ``read`` and ``write`` and are independent: ``write`` does not imply ``read``.
``#`` starts a comment (so a token cannot contain ``#``). ``NAME`` is who the token belongs
to; the ingest server records it as the ``producer`` of the facts it receives. Without a
``NAME``, the principal is named ``token-<first 8 hex digits of the token's SHA-256>``, which is
stable and does not reveal the token.

Errors (all :class:`~ttstore.TimetravelError`)::

    TimetravelError
    ├── AuthNotConfigured    a server with neither a tokens file nor --no-auth (refuses to start)
    ├── InvalidTokensFile    the tokens file is missing or has a bad line (names the line)
    ├── Unauthorized         401: no bearer token, or one that is not in the tokens file
    └── Forbidden            403: a valid token without the scope the route needs
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._config import ENV_TOKENS_FILE
from ._errors import TimetravelError

log = logging.getLogger(__name__)

READ = "read"
WRITE = "write"
#: Every scope a token can carry.
SCOPES = frozenset((READ, WRITE))
#: The principal's name on a server started with ``--no-auth``.
ANONYMOUS_NAME = "anonymous"

_NAME = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


class AuthNotConfigured(TimetravelError):
    code = "auth_not_configured"
    http_status = 500


class InvalidTokensFile(TimetravelError):
    code = "invalid_tokens_file"
    http_status = 500


class Unauthorized(TimetravelError):
    code = "unauthorized"
    http_status = 401


class Forbidden(TimetravelError):
    code = "forbidden"
    http_status = 403


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name and its scopes."""

    name: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes


#: Everyone, on a server started with ``--no-auth``.
ANONYMOUS = Principal(ANONYMOUS_NAME, SCOPES)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, *, source: str = "tokens file") -> dict[str, Principal]:
    """Parse a tokens file's text.

    Args:
        text: the file's content.
        source: how to name the file in error messages.

    Returns:
        The SHA-256 hex digest of each token → its principal (tokens are not kept in memory).

    Raises:
        InvalidTokensFile: naming ``source`` and the line number of the first bad line, or when
            the file has no token at all.
    """
    out: dict[str, Principal] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def bad(reason: str, lineno: int = lineno) -> InvalidTokensFile:
            return InvalidTokensFile(
                f"{source}, line {lineno}: {reason} (expected: TOKEN SCOPE[,SCOPE] [NAME], "
                f"scopes {', '.join(sorted(SCOPES))})"
            )

        parts = line.split()
        if len(parts) < 2:
            raise bad("missing the scopes")
        if len(parts) > 3:
            raise bad("too many columns")
        token, scope_text = parts[0], parts[1]
        scopes = scope_text.split(",")
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise bad(f"unknown scope {unknown[0]!r}")
        digest = _digest(token)
        if len(parts) == 3:
            name = parts[2]
            if not _NAME.match(name):
                raise bad("the name must be printable ASCII without spaces, at most 128 chars")
        else:
            name = f"token-{digest[:8]}"
        if digest in out:
            raise bad(f"same token as on line {first_line[digest]}")
        out[digest] = Principal(name, frozenset(scopes))
        first_line[digest] = lineno
    if not out:
        raise InvalidTokensFile(f"{source} has no tokens: every request would be refused")
    return out


def load_tokens(path: str | os.PathLike[str]) -> dict[str, Principal]:
    """Read and parse a tokens file (see :func:`parse_tokens`).

    Raises:
        InvalidTokensFile: the file cannot be read, or has a bad line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidTokensFile(f"cannot read tokens file {str(path)!r}: {exc}") from exc
    return parse_tokens(text, source=f"tokens file {str(path)!r}")


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`.

    Args:
        tokens: token digests → principals (from :func:`load_tokens`); ignored with ``no_auth``.
        no_auth: auth is off: every request is :data:`ANONYMOUS`, with both scopes.

    Raises:
        AuthNotConfigured: neither tokens nor ``no_auth`` were given.
    """

    def __init__(
        self, tokens: Mapping[str, Principal] | None = None, *, no_auth: bool = False
    ) -> None:
        if not no_auth and not tokens:
            raise AuthNotConfigured(
                "refusing to start without auth: give --tokens-file PATH (or set "
                f"{ENV_TOKENS_FILE}) with lines 'TOKEN SCOPE[,SCOPE] [NAME]', or turn auth off "
                "explicitly with --no-auth"
            )
        self.no_auth = no_auth
        self._tokens = dict(tokens or {})

    @classmethod
    def from_options(
        cls,
        *,
        tokens_file: str | None,
        no_auth: bool,
        environ: Mapping[str, str] | None = None,
    ) -> Authenticator:
        """The authenticator for a server's ``--tokens-file`` / ``--no-auth`` options.

        ``--tokens-file`` falls back to ``TIMETRAVEL_TOKENS_FILE``. Giving both
        ``--tokens-file`` and ``--no-auth`` is an error; ``--no-auth`` overrides the environment
        variable, with a warning.

        Raises:
            AuthNotConfigured: neither was given, or both on the command line.
            InvalidTokensFile: the tokens file is unreadable or has a bad line.
        """
        env = os.environ if environ is None else environ
        if no_auth:
            if tokens_file:
                raise AuthNotConfigured("--tokens-file and --no-auth contradict each other")
            if env.get(ENV_TOKENS_FILE):
                log.warning("--no-auth: ignoring %s=%s", ENV_TOKENS_FILE, env[ENV_TOKENS_FILE])
            return cls(no_auth=True)
        path = tokens_file or env.get(ENV_TOKENS_FILE) or None
        if path is None:
            return cls()  # raises AuthNotConfigured, saying why
        return cls(load_tokens(path))

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value.

        Raises:
            Unauthorized: the header is missing, not ``Bearer <token>``, or the token is unknown.
        """
        if self.no_auth:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("this route needs a bearer token (Authorization: Bearer TOKEN)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer TOKEN'")
        principal = self._tokens.get(_digest(token))
        if principal is None:
            raise Unauthorized("the bearer token is not valid")
        return principal

    def authorize(self, principal: Principal, scope: str) -> None:
        """Check that ``principal`` has ``scope``.

        Raises:
            Forbidden: it does not.
        """
        if not principal.has(scope):
            raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope this route needs")
