"""The feature repo (SPEC §5): a Python module that declares fact types, snapshot services and
encoders, passed as ``--repo PATH`` or ``TIMETRAVEL_REPO``.

What counts as a declaration, at module level:

- a :class:`factlog.FactType` (any variable name), or a ``fact_types`` list of them;
- a :class:`snapshotter.ServiceConfig`, or a ``services`` dict of name → ServiceConfig or of
  name → a table of its options (as in a services TOML file);
- an :class:`Encoder` (what ``@encoder(...)`` returns), or an ``encoders`` list of them.

The same object bound to two names is one declaration; two different declarations of one name
are an error. Encoder names never contain a dot, so they cannot be read as a built-in form, and
must not equal a fact type or service name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from factlog import Declared, FactType, FactTypeCatalog
from snapshotter import ServiceConfig, ServiceConfigError
from ttstore import ENV_REPO, Store

from ._encoders import Encoder
from ._errors import EncoderDefinitionError, RepoError

__all__ = ["REPO_ENV", "FeatureRepo"]

#: The environment variable naming the feature repo when ``--repo`` is not given.
REPO_ENV = ENV_REPO


@dataclass(frozen=True, kw_only=True)
class FeatureRepo:
    """A loaded feature repo.

    Attributes:
        source: the file path or dotted module name it came from ("" if built in code).
        fact_types: name → :class:`factlog.FactType`, in declaration order.
        services: name → :class:`snapshotter.ServiceConfig`.
        encoders: name → :class:`Encoder` (bound: lookbacks and entity types resolved).
    """

    source: str = ""
    fact_types: Mapping[str, FactType] = field(default_factory=dict)
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    encoders: Mapping[str, Encoder] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> FeatureRepo:
        """Load a repo from a ``.py`` file, a package directory, or a dotted module name.

        Args:
            path: where the repo is; default ``$TIMETRAVEL_REPO``.

        Raises:
            RepoError: ``repo_not_found`` (no such file or module, or nothing given);
                ``repo_syntax_error`` / ``repo_import_error`` naming the file and line;
                ``repo_duplicate_name`` or ``repo_invalid`` for bad declarations.
        """
        if path is None:
            path = os.environ.get(REPO_ENV)
            if not path:
                raise RepoError(f"no feature repo given (--repo PATH or {REPO_ENV})",
                                code="repo_not_found")
        text = os.fspath(path)
        module = _import(text)
        repo = cls.from_module(module, source=text)
        where = str(Path(text).resolve()) if Path(text).exists() else text
        for enc in repo.encoders.values():
            enc.repo_source = where
        return repo

    @classmethod
    def from_module(cls, module: ModuleType, *, source: str | None = None) -> FeatureRepo:
        """Collect the declarations of an imported module (see the module docstring)."""
        return cls.from_objects(_declarations(vars(module)),
                                source=source if source is not None else module.__name__)

    @classmethod
    def from_objects(cls, objects: Iterable[Any], *, source: str = "") -> FeatureRepo:
        """A repo from declarations given directly (FactType, ServiceConfig, Encoder objects).

        Raises:
            RepoError: duplicate or clashing names, or an encoder with unknown inputs.
        """
        fts: dict[str, FactType] = {}
        svcs: dict[str, ServiceConfig] = {}
        encs: dict[str, Encoder] = {}
        for obj in objects:
            if isinstance(obj, FactType):
                _add(fts, obj.name, obj, "fact type", source)
            elif isinstance(obj, ServiceConfig):
                _add(svcs, obj.name, obj, "snapshot service", source)
            elif isinstance(obj, Encoder):
                _add(encs, obj.name, obj, "encoder", source)
        for name, enc in encs.items():
            clash = ("a fact type" if name in fts else "a snapshot service" if name in svcs
                     else "the snapshot prefix" if name == "snapshot" else None)
            if clash:
                raise RepoError(f"{_where(source)}encoder {name!r} has the name of {clash}; "
                                "rename it", code="repo_duplicate_name")
            try:
                enc.bind(fts, svcs)
            except EncoderDefinitionError as exc:
                raise RepoError(f"{_where(source)}{exc.message}", code="repo_invalid") from None
        return cls(source=source, fact_types=fts, services=svcs, encoders=encs)

    def declare(self, store: Store | str) -> list[Declared]:
        """Declare (or check) every fact type of the repo in ``store``'s catalog.

        Raises:
            FactTypeError: an incompatible change to a stored fact type, naming the field.
            StoreUnavailable: the store could not be written.
        """
        st = store if isinstance(store, Store) else Store(store)
        return FactTypeCatalog(st).declare_all(self.fact_types.values())

    @property
    def versions(self) -> dict[str, str]:
        """Encoder name → version."""
        return {n: e.version for n, e in self.encoders.items()}

    @property
    def fingerprint(self) -> str:
        """One hash of every encoder's version (changes when any encoder's code changes)."""
        h = hashlib.sha256()
        for name in sorted(self.encoders):
            h.update(f"{name}={self.encoders[name].version};".encode())
        return h.hexdigest()[:16]


def _where(source: str) -> str:
    return f"feature repo {source}: " if source else ""


def _add(into: dict[str, Any], name: str, obj: Any, what: str, source: str) -> None:
    old = into.get(name)
    if old is not None and old is not obj and old != obj:
        raise RepoError(f"{_where(source)}{what} {name!r} is declared twice, differently",
                        code="repo_duplicate_name")
    into[name] = obj


def _declarations(namespace: Mapping[str, Any]) -> list[Any]:
    out: list[Any] = []
    for var, value in namespace.items():
        if var.startswith("__"):
            continue
        if isinstance(value, FactType | ServiceConfig | Encoder):
            out.append(value)
        elif var in ("fact_types", "encoders") and isinstance(value, list | tuple):
            out.extend(value)
        elif var == "services" and isinstance(value, Mapping):
            out.extend(_service(name, cfg) for name, cfg in value.items())
    return out


def _service(name: str, cfg: Any) -> ServiceConfig:
    if isinstance(cfg, ServiceConfig):
        if cfg.name != name:
            raise RepoError(f"services[{name!r}] is a ServiceConfig named {cfg.name!r}",
                            code="repo_invalid")
        return cfg
    if not isinstance(cfg, Mapping):
        raise RepoError(f"services[{name!r}] must be a ServiceConfig or a table of options",
                        code="repo_invalid")
    unknown = sorted(set(cfg) - set(ServiceConfig.__dataclass_fields__) - {"name"})
    if unknown:
        raise RepoError(f"services[{name!r}]: unknown key {unknown[0]!r}", code="repo_invalid")
    try:
        return ServiceConfig(**{"name": name, **cfg})
    except ServiceConfigError as exc:
        raise RepoError(f"services[{name!r}]: {exc.message}", code="repo_invalid") from None


def _import(text: str) -> ModuleType:
    p = Path(text)
    if text.endswith(".py") or p.exists():
        if p.is_dir():
            p = p / "__init__.py"
        if not p.is_file():
            raise RepoError(f"feature repo {text!r}: no such file", code="repo_not_found")
        p = p.resolve()
        digest = hashlib.sha256(str(p).encode()).hexdigest()[:12]
        modname = f"_timetravel_repo_{digest}"
        spec = importlib.util.spec_from_file_location(modname, p)
        if spec is None or spec.loader is None:
            raise RepoError(f"feature repo {text!r}: cannot be imported", code="repo_not_found")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module  # dataclasses and pickling look modules up by name
        try:
            _exec(lambda: spec.loader.exec_module(module), str(p))  # type: ignore[union-attr]
        except BaseException:
            sys.modules.pop(modname, None)
            raise
        return module
    try:
        imported: ModuleType = _exec(lambda: importlib.import_module(text), text)
        return imported
    except RepoError:
        raise
    except ModuleNotFoundError as exc:
        raise RepoError(f"feature repo {text!r}: no such file or module ({exc.msg})",
                        code="repo_not_found") from None


def _exec(run: Any, label: str) -> Any:
    try:
        return run()
    except SyntaxError as exc:
        raise RepoError(
            f"feature repo {exc.filename or label}, line {exc.lineno}: syntax error: {exc.msg}",
            code="repo_syntax_error") from None
    except ModuleNotFoundError as exc:
        if exc.name and label.replace("/", ".").startswith(exc.name):
            raise
        raise _import_error(exc, label) from None
    except RepoError:
        raise
    except Exception as exc:
        raise _import_error(exc, label) from None


def _import_error(exc: BaseException, label: str) -> RepoError:
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if f.filename == label]  # the repo file's own line, if any
    others = [f for f in frames if not f.filename.startswith("<frozen")]
    picked = mine or others
    where = f"{picked[-1].filename}, line {picked[-1].lineno}" if picked else label
    message = exc.message if isinstance(exc, EncoderDefinitionError) else str(exc)
    return RepoError(f"feature repo {where}: {type(exc).__name__}: {message}",
                     code="repo_import_error")
