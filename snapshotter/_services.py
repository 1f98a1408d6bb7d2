"""The services config: which microservices a snapshot run calls, and how hard (SPEC §2).

A services file is TOML with one table per service::

    [services.viewing_history]
    url = "http://127.0.0.1:9001/v1/viewing_history/{entity_id}"
    batch_url = "http://127.0.0.1:9001/v1/viewing_history:batchGet"
    entity_type = "int64"
    timeout_s = 2.0
    retries = 3
    max_concurrency = 64
    max_qps = 500
    max_staleness = "48h"
    headers = { Authorization = "Bearer ${HISTORY_TOKEN}" }

Every key but ``url`` is optional; unknown keys are errors. ``${VAR}`` in a header value is read
from the environment when the file is loaded (``$$`` is a literal ``$``); a variable that is not
set is an error naming it. The config object keeps the templates, never the resolved secrets, so
:meth:`ServiceConfig.public_json` (what manifests record) cannot leak them.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from ttstore import ENTITY_TYPES, NAME_PATTERN, InvalidDuration, parse_duration

from ._errors import ServiceConfigError

__all__ = ["ServiceConfig", "load_services", "parse_services", "render_services"]

_NAME = re.compile(NAME_PATTERN)
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

#: The value recorded for every header in :meth:`ServiceConfig.public_json`.
REDACTED = "<redacted>"
DEFAULT_MAX_STALENESS = "48h"
ENTITY_ID_PLACEHOLDER = "{entity_id}"


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """One snapshot service: where to call it and the limits to keep to.

    Args:
        name: the service name, ``^[a-z][a-z0-9_]{0,62}$``.
        url: the per-entity GET, with ``{entity_id}`` where the key goes (URL-encoded).
        batch_url: optional ``POST`` endpoint taking ``{"ids": [...]}``; used when set.
        entity_type: ``int64`` or ``string``: the type of the keys the service takes.
        timeout_s: per-request timeout (each attempt).
        retries: further attempts after a 5xx, 429, timeout or connection error.
        max_concurrency: requests in flight at once.
        max_qps: requests started in any one-second window, bursts and retries included;
            None for no limit. With ``--shard i/n`` each shard keeps to ``max_qps / n``.
        max_staleness: how old a snapshot row may be and still be served (``"48h"``).
        headers: request headers; values may hold ``${VAR}`` (resolved by :meth:`resolve_headers`).
        batch_size: ids per batch request.
        backoff_base_s: the first retry waits up to this long; each further one doubles it.
        backoff_max_s: the cap on one wait between attempts.

    Raises:
        ServiceConfigError: a value out of range or of the wrong type, naming it.
    """

    name: str
    url: str
    batch_url: str | None = None
    entity_type: str = "int64"
    timeout_s: float = 2.0
    retries: int = 3
    max_concurrency: int = 64
    max_qps: float | None = None
    max_staleness: str = DEFAULT_MAX_STALENESS
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    batch_size: int = 100
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ServiceConfigError(
                f"service name {name!r} is not valid (must match {NAME_PATTERN})",
                service=name if isinstance(name, str) else None,
                field="name",
                code="invalid_name",
            )
        _check_url(name, "url", self.url, placeholder=True)
        if self.batch_url is not None:
            _check_url(name, "batch_url", self.batch_url, placeholder=False)
        if self.entity_type not in ENTITY_TYPES:
            _fail(name, "entity_type", f"{self.entity_type!r} is not one of {list(ENTITY_TYPES)}")
        put = object.__setattr__  # frozen: normalize once, here
        put(self, "timeout_s", _positive(name, "timeout_s", self.timeout_s))
        put(self, "retries", _int(name, "retries", self.retries, 0, 100))
        put(self, "max_concurrency", _int(name, "max_concurrency", self.max_concurrency, 1, 10**5))
        if self.max_qps is not None:
            put(self, "max_qps", _positive(name, "max_qps", self.max_qps))
        try:
            parse_duration(self.max_staleness, field="max_staleness")
        except InvalidDuration as exc:
            _fail(name, "max_staleness", exc.message)
        put(self, "batch_size", _int(name, "batch_size", self.batch_size, 1, 10**5))
        put(self, "backoff_base_s", _positive(name, "backoff_base_s", self.backoff_base_s))
        put(self, "backoff_max_s", _positive(name, "backoff_max_s", self.backoff_max_s))
        if not isinstance(self.headers, Mapping):
            _fail(name, "headers", "must be a table of header name = value")
        for h, v in self.headers.items():
            if not isinstance(h, str) or not _HEADER_NAME.fullmatch(h):
                _fail(name, "headers", f"{h!r} is not a valid header name")
            if not isinstance(v, str):
                _fail(name, f"headers.{h}", f"must be a string, not {type(v).__name__}")
            _expand(v, {}, service=name, header=h, check_only=True)
        put(self, "headers", dict(self.headers))  # a copy: the caller's dict may change

    @property
    def max_staleness_us(self) -> int:
        """``max_staleness`` in microseconds."""
        return parse_duration(self.max_staleness, field="max_staleness")

    @property
    def uses_batch(self) -> bool:
        """Whether fetches go to ``batch_url``."""
        return self.batch_url is not None

    def entity_url(self, entity_id: int | str) -> str:
        """The per-entity URL for one key (the key is URL-encoded, so ``/`` cannot escape)."""
        from urllib.parse import quote

        return self.url.replace(ENTITY_ID_PLACEHOLDER, quote(str(entity_id), safe=""))

    def resolve_headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers with every ``${VAR}`` replaced from ``environ`` (default ``os.environ``).

        Raises:
            ServiceConfigError: code ``missing_env_var``, naming the variable, the header and
                the service.
        """
        env = os.environ if environ is None else environ
        return {
            h: _expand(v, env, service=self.name, header=h) for h, v in self.headers.items()
        }

    def public_json(self) -> dict[str, Any]:
        """The config without secrets, as recorded in run plans and manifests: header values
        are redacted (names kept), and a password in a URL is dropped."""
        return {
            "name": self.name,
            "url": _strip_password(self.url),
            "batch_url": None if self.batch_url is None else _strip_password(self.batch_url),
            "entity_type": self.entity_type,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "max_concurrency": self.max_concurrency,
            "max_qps": self.max_qps,
            "max_staleness": self.max_staleness,
            "max_staleness_us": self.max_staleness_us,
            "batch_size": self.batch_size,
            "backoff_base_s": self.backoff_base_s,
            "backoff_max_s": self.backoff_max_s,
            "headers": dict.fromkeys(sorted(self.headers), REDACTED),
        }


_KEYS = frozenset(f for f in ServiceConfig.__dataclass_fields__ if f != "name")


def parse_services(
    doc: Mapping[str, Any], *, environ: Mapping[str, str] | None = None, source: str = "services"
) -> dict[str, ServiceConfig]:
    """Services from a parsed TOML document (``{"services": {name: {...}}}``).

    Args:
        doc: the document.
        environ: where ``${VAR}`` in headers are looked up (default ``os.environ``); every
            variable is checked now, so a missing one fails at load, not mid-run.
        source: named in error messages (the file path).

    Returns:
        The services by name, in the file's order.

    Raises:
        ServiceConfigError: an unknown key (naming it and the service), a bad name or value, or
            a ``${VAR}`` that is not set (code ``missing_env_var``).
    """
    unknown = sorted(set(doc) - {"services"})
    if unknown:
        raise ServiceConfigError(
            f"{source}: unknown top-level key {unknown[0]!r} (only [services.<name>] tables)",
            field=unknown[0],
        )
    services = doc.get("services")
    if not isinstance(services, Mapping) or not services:
        raise ServiceConfigError(
            f"{source}: no services; add a [services.<name>] table", field="services"
        )
    out: dict[str, ServiceConfig] = {}
    for name, body in services.items():
        if not isinstance(body, Mapping):
            raise ServiceConfigError(
                f"{source}: services.{name} must be a table", service=name, field=name
            )
        extra = sorted(set(body) - _KEYS)
        if extra:
            raise ServiceConfigError(
                f"{source}: service {name!r} has unknown key {extra[0]!r} "
                f"(known: {', '.join(sorted(_KEYS))})",
                service=name,
                field=extra[0],
            )
        if "url" not in body:
            raise ServiceConfigError(
                f"{source}: service {name!r} has no url", service=name, field="url"
            )
        try:
            config = ServiceConfig(name=name, **dict(body))
        except ServiceConfigError as exc:
            raise ServiceConfigError(
                f"{source}: {exc.message}", service=exc.service, field=exc.field, code=exc.code
            ) from None
        config.resolve_headers(environ)
        out[name] = config
    return out


def load_services(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> dict[str, ServiceConfig]:
    """Read a services TOML file (see the module docstring).

    Raises:
        ServiceConfigError: the file cannot be read or parsed, or a service is invalid.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ServiceConfigError(f"cannot read services file {str(p)!r}: {exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ServiceConfigError(f"services file {str(p)!r} is not valid TOML: {exc}") from exc
    return parse_services(doc, environ=environ, source=str(p))


def render_services(services: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text for services given as ``{name: {key: value}}`` (each checked by building a
    :class:`ServiceConfig`), the inverse of :func:`parse_services` for the keys it knows."""
    lines: list[str] = []
    for name, body in services.items():
        ServiceConfig(name=name, **dict(body))
        lines.append(f"[services.{name}]")
        for k, v in body.items():
            if k not in _KEYS:
                raise ServiceConfigError(f"unknown key {k!r}", service=name, field=k)
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def _toml_str(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{out}"'


def _fail(service: str, key: str, why: str) -> NoReturn:
    raise ServiceConfigError(f"service {service!r}: {key} {why}", service=service, field=key)


def _positive(service: str, key: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        _fail(service, key, f"must be a positive number, not {v!r}")
    return float(v)


def _int(service: str, key: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(service, key, f"must be an integer in [{lo}, {hi}], not {v!r}")
    return v


def _check_url(service: str, key: str, url: object, *, placeholder: bool) -> None:
    if not isinstance(url, str):
        _fail(service, key, f"must be a string, not {type(url).__name__}")
    parts = urlsplit(url.replace(ENTITY_ID_PLACEHOLDER, "x"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        _fail(service, key, f"{url!r} is not an http(s) URL")
    has = url.count(ENTITY_ID_PLACEHOLDER)
    if placeholder and has != 1:
        _fail(service, key, f"{url!r} must contain {ENTITY_ID_PLACEHOLDER} exactly once")
    if not placeholder and has:
        _fail(service, key, f"{url!r} must not contain {ENTITY_ID_PLACEHOLDER}")


def _strip_password(url: str) -> str:
    parts = urlsplit(url.replace(ENTITY_ID_PLACEHOLDER, "\0"))
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)).replace("\0", ENTITY_ID_PLACEHOLDER)


def _expand(
    template: str,
    env: Mapping[str, str],
    *,
    service: str,
    header: str,
    check_only: bool = False,
) -> str:
    """Replace ``${VAR}`` from ``env``; ``$$`` is ``$``. A lone ``$`` is an error (a typo that
    would otherwise send a literal ``$VAR`` as a credential)."""

    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok == "$$":
            return "$"
        var = m.group(1)
        if var is None:
            raise ServiceConfigError(
                f"service {service!r}: headers.{header}: a '$' must start ${{VAR}} "
                "(write $$ for a literal $)",
                service=service,
                field=f"headers.{header}",
            )
        if check_only:
            return ""
        if var not in env:
            raise ServiceConfigError(
                f"service {service!r}: headers.{header} needs environment variable {var}, "
                "which is not set",
                service=service,
                field=f"headers.{header}",
                code="missing_env_var",
            )
        return env[var]

    return _VAR.sub(sub, template)
