"""Feature encoders (SPEC §5): the decorator, the :class:`Encoder` object and its version, and
:func:`evaluate_encoders`, the offline evaluation the engine calls.

Declaring one in a feature repo::

    from timetravel_api import encoder, facts, snapshot

    @encoder(inputs=[facts("playback", window="7d"), snapshot("viewing_history")],
             output="float64")
    def minutes_7d(view) -> float | None:
        return sum(f["seconds"] for f in view.facts("playback")) / 60

    @minutes_7d.batch              # optional vectorized form over Arrow arrays
    def _(batch: Batch) -> pa.Array: ...

The engine's contract (what ``timetravel_api._engine`` calls)::

    evaluate_encoders(encoders, entities, at_us, *, facts, snapshots, knowledge, entity_cols)
        -> {encoder name: (values: pa.Array, status: np.ndarray of str)}

- ``encoders``: :class:`Encoder` objects (bound to a repo, so their fact types are known).
- ``entities``: the query entity keys (pa.Array, one per query row); ``at_us``: int64 µs.
- ``facts``: fact type name → its deduplicated facts (stored schema: ``fact_id``, the entity
  column, ``event_time``, ``logged_at``, ..., the fields), sorted by (entity, event_time,
  logged_at, fact_id) and covering every query's declared windows: the engine reads event_time
  in ``[min(at) - max span, max(at)]``, where an input's span is :attr:`FactInput.span_us`
  (its window, else the fact type's lookback; None: all history). Only the fact types in
  :attr:`Encoder.fact_types` of some encoder are needed. Extra facts (outside a window, logged
  after ``at``, other entities) are fine: visibility (SPEC §3) is applied here.
- ``snapshots``: service name → the result of ``SnapshotReader.read(service, entities, at,
  knowledge=knowledge, raw_json=True)``, aligned with the query rows (needs ``status`` and
  ``raw_json``; ``payload`` is handed to batch forms).
- ``knowledge``: ``"as_known"`` or ``"event"``; ``entity_cols``: fact type → entity column name.
- Returns the values (Arrow, of :attr:`Encoder.output_type` when declared) and a status per
  value: ``ok``; ``missing`` when the encoder returned None (or the snapshot status when the
  encoder returned None and one of its snapshots was ``stale``, ``not_sampled`` or ``error``);
  ``error`` when it raised or returned a value that does not fit its output type. One value's
  error never fails the batch; a batch form that raises falls back to the row form.

:attr:`Encoder.version` is recorded with every output (the engine puts it in lineage).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ttstore import NAME_PATTERN, TIMESTAMP_TYPE, arrow_type, check_name

from ._errors import EncoderDefinitionError
from ._features import window_us as _window_us
from ._versions import code_version, module_source
from ._view import Batch, RowSource, View, visible_positions

__all__ = [
    "Encoder",
    "FactInput",
    "SnapshotInput",
    "encoder",
    "evaluate_encoders",
    "facts",
    "snapshot",
]

_STATUS_FROM_SNAPSHOT = ("error", "stale", "not_sampled")


@dataclass(frozen=True)
class FactInput:
    """An encoder input: the visible facts of ``fact_type`` in ``window`` (SPEC §3).

    Attributes:
        fact_type: the fact type name.
        window: ``"7d"``, or None for every visible fact within the fact type's lookback.
        window_us: the window in µs (None when unwindowed).
        lookback_us: the fact type's lookback, filled in when a repo binds the encoder.
    """

    fact_type: str
    window: str | None = None
    window_us: int | None = None
    lookback_us: int | None = None

    @property
    def span_us(self) -> int | None:
        """How far before ``at`` a fact is still in view: the window, else the lookback
        (None: unbounded)."""
        return self.window_us if self.window_us is not None else self.lookback_us


@dataclass(frozen=True)
class SnapshotInput:
    """An encoder input: the as-of snapshot of ``service`` (SPEC §3)."""

    service: str


def facts(fact_type: str, *, window: str | None = None) -> FactInput:
    """Declare a fact input of an encoder: the facts of ``fact_type`` visible at ``at`` with
    ``event_time`` in ``(at - window, at]`` (or within the fact type's lookback).

    Raises:
        EncoderDefinitionError: a malformed name or window.
    """
    _check_name(fact_type, "fact type")
    if window is None:
        return FactInput(fact_type)
    try:
        return FactInput(fact_type, window, _window_us(window))
    except ValueError as exc:
        raise EncoderDefinitionError(f"facts({fact_type!r}): {exc}") from None


def snapshot(service: str) -> SnapshotInput:
    """Declare a snapshot input of an encoder: ``service``'s as-of payload.

    Raises:
        EncoderDefinitionError: a malformed service name.
    """
    _check_name(service, "snapshot service")
    return SnapshotInput(service)


def _check_name(name: object, what: str) -> None:
    try:
        check_name(name, what=what)
    except Exception as exc:
        raise EncoderDefinitionError(f"{what} name {name!r} must match {NAME_PATTERN}") from exc


class Encoder:
    """A named feature computed by a plain function of the as-of :class:`View`.

    Calling the encoder (``enc(view)``) runs the row form on ``view`` restricted to the declared
    inputs and windows: the same callable online (on :meth:`View.live`) and offline.

    Attributes:
        name: the feature name (a valid name without dots, so never a built-in form).
        fn: the row form, ``fn(view) -> value | None``.
        batch_fn: the optional vectorized form, ``batch_fn(batch: Batch) -> pa.Array``.
        inputs: the declared :class:`FactInput` / :class:`SnapshotInput`, in order.
        output: the declared output type name (``"float64"``, ...) or None.
        output_type: its Arrow type (None when undeclared: inferred from the values).
        entity_type: ``int64`` or ``string``; declared, or taken from the inputs by the repo.
    """

    def __init__(
        self, fn: Callable[[View], Any], *, inputs: Sequence[FactInput | SnapshotInput],
        output: str | None = None, name: str | None = None, entity_type: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name if name is not None else fn.__name__
        _check_name(self.name, "encoder")
        bad = [i for i in inputs if not isinstance(i, FactInput | SnapshotInput)]
        if bad:
            raise EncoderDefinitionError(
                f"encoder {self.name!r}: inputs must be facts(...) or snapshot(...), got {bad[0]!r}"
            )
        self.inputs: tuple[FactInput | SnapshotInput, ...] = tuple(inputs)
        self.output = output
        self.output_type: pa.DataType | None = None
        if output is not None:
            try:
                self.output_type = arrow_type(output)
            except Exception as exc:
                raise EncoderDefinitionError(f"encoder {self.name!r}: {exc}") from None
        if entity_type is not None and entity_type not in ("int64", "string"):
            raise EncoderDefinitionError(
                f"encoder {self.name!r}: entity_type must be int64 or string, not {entity_type!r}"
            )
        self.entity_type = entity_type
        self.batch_fn: Callable[[Batch], Any] | None = None
        self.json_fields: dict[str, tuple[str, ...]] = {}
        self._module_source = module_source(fn)
        #: Where the repo that declares it was loaded from (set by ``FeatureRepo.load``).
        self.repo_source: str | None = None
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    # -- declaration ---------------------------------------------------------------------------
    def batch(self, fn: Callable[[Batch], Any]) -> Callable[[Batch], Any]:
        """Decorator registering the vectorized form; returns ``fn`` unchanged."""
        self.batch_fn = fn
        self.__dict__.pop("version", None)
        return fn

    @property
    def fact_inputs(self) -> tuple[FactInput, ...]:
        return tuple(i for i in self.inputs if isinstance(i, FactInput))

    @property
    def fact_types(self) -> tuple[str, ...]:
        """The fact types read, each once, in declaration order."""
        return tuple(dict.fromkeys(i.fact_type for i in self.fact_inputs))

    @property
    def services(self) -> tuple[str, ...]:
        """The snapshot services read, in declaration order."""
        return tuple(dict.fromkeys(i.service for i in self.inputs if isinstance(i, SnapshotInput)))

    @property
    def fact_fed(self) -> bool:
        """Reads facts only: its online/offline parity is exact (SPEC §5)."""
        return not self.services

    def max_span_us(self) -> int | None:
        """The largest span of the fact inputs (None: some input is unbounded; 0: no facts)."""
        spans = [i.span_us for i in self.fact_inputs]
        if any(s is None for s in spans):
            return None
        return max((s for s in spans if s is not None), default=0)

    def bind(self, fact_types: Mapping[str, Any], services: Mapping[str, Any]) -> None:
        """Resolve the inputs against a repo's fact types and services: fills lookbacks, the
        json fields to decode, and the entity type. Called by :class:`FeatureRepo`.

        Raises:
            EncoderDefinitionError: an unknown input, or inputs of different entity key types.
        """
        etypes: dict[str, list[str]] = {}
        resolved: list[FactInput | SnapshotInput] = []
        for inp in self.inputs:
            if isinstance(inp, FactInput):
                ft = fact_types.get(inp.fact_type)
                if ft is None:
                    raise EncoderDefinitionError(
                        f"encoder {self.name!r}: unknown fact type {inp.fact_type!r}")
                etypes.setdefault(ft.entity_type, []).append(inp.fact_type)
                inp = FactInput(inp.fact_type, inp.window, inp.window_us, ft.lookback_us)
                self.json_fields[ft.name] = tuple(
                    f for f, t in ft.fields.items() if t == "json")
            else:
                svc = services.get(inp.service)
                if svc is None:
                    raise EncoderDefinitionError(
                        f"encoder {self.name!r}: unknown snapshot service {inp.service!r}")
                etypes.setdefault(svc.entity_type, []).append(f"snapshot {inp.service}")
            resolved.append(inp)
        if self.entity_type is not None:
            etypes.setdefault(self.entity_type, []).append("entity_type=")
        if len(etypes) > 1:
            raise EncoderDefinitionError(
                f"encoder {self.name!r}: inputs have different entity key types: "
                + "; ".join(f"{t}: {', '.join(n)}" for t, n in etypes.items()))
        self.inputs = tuple(resolved)
        if etypes:
            self.entity_type = next(iter(etypes))
        self.__dict__.pop("version", None)

    # -- running -------------------------------------------------------------------------------
    def __call__(self, view: View) -> Any:
        """The row form on ``view`` restricted to the declared inputs (raises what it raises)."""
        return self.fn(view.restrict(self))

    def evaluate(self, view: View) -> tuple[Any, str]:
        """``(value, status)`` as the engine would give it: the value coerced to the output
        type; ``missing`` for None, ``error`` when the encoder raised or the value does not fit.
        What a service should log (see :func:`log_served_features`)."""
        try:
            value = self(view)
        except Exception:
            return None, "error"
        if value is None:
            return None, _none_status(view.restrict(self), self.services)
        try:
            return self.coerce(value), "ok"
        except Exception:
            return None, "error"

    def coerce(self, value: Any) -> Any:
        """``value`` as it comes back out of the output column (``3`` → ``3.0`` for float64).

        Raises:
            pyarrow.ArrowException, TypeError, ValueError: it does not fit the output type.
        """
        if value is None or self.output_type is None:
            return value
        if self.output == "json":
            return json_text(value)
        return pa.array([value], type=self.output_type).to_pylist()[0]

    @functools.cached_property
    def version(self) -> str:
        """Hash of the encoder's code (row and batch forms: source, else bytecode and
        constants), its declaration, and the source of the module that defines it."""
        decl = {
            "name": self.name,
            "output": self.output,
            "inputs": [
                [i.fact_type, i.window] if isinstance(i, FactInput) else ["snapshot", i.service]
                for i in self.inputs
            ],
        }
        return code_version(decl, (self.fn, self.batch_fn), self._module_source)

    def __reduce__(self) -> Any:
        # An encoder of a repo loaded from a file lives in a module only this process has; a
        # worker process (spawned, or a Spark executor) loads the repo again by its source.
        if self.repo_source:
            return (_encoder_from_repo, (self.repo_source, self.name, self.version))
        module = sys.modules.get(self.__module__)
        attr = getattr(self, "__name__", self.name)
        if module is not None and getattr(module, attr, None) is self:
            return attr  # pickled by reference, as a module-level function is
        return super().__reduce__()

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, inputs={list(self.inputs)!r}, output={self.output!r})"


def encoder(
    *, inputs: Sequence[FactInput | SnapshotInput], output: str | None = None,
    name: str | None = None, entity_type: str | None = None,
) -> Callable[[Callable[[View], Any]], Encoder]:
    """Decorate a function of the as-of :class:`View` into an :class:`Encoder`.

    Args:
        inputs: the fact inputs (:func:`facts`) and snapshot inputs (:func:`snapshot`) the
            function reads; the view refuses anything else.
        output: the output type (``int64``, ``float64``, ``bool``, ``string``, ``timestamp``,
            ``json``, ``list<...>``); inferred from the values when None.
        name: the feature name (default: the function's name).
        entity_type: ``int64`` or ``string``, for an encoder with no inputs; otherwise taken
            from the inputs when the repo loads.

    Raises:
        EncoderDefinitionError: a malformed name, input or output type.
    """

    def wrap(fn: Callable[[View], Any]) -> Encoder:
        return Encoder(fn, inputs=inputs, output=output, name=name, entity_type=entity_type)

    return wrap


def _encoder_from_repo(source: str, name: str, version: str) -> Encoder:
    from ._errors import RepoError
    from ._repo import FeatureRepo

    for fresh in (False, True):
        repo = None if fresh else _REPOS.get(source)
        if repo is None:
            repo = _REPOS[source] = FeatureRepo.load(source)
        enc = repo.encoders.get(name)
        if enc is not None and enc.version == version:
            return enc
    raise RepoError(f"feature repo {source}: encoder {name!r} version {version} is not the "
                    "one this process loads (the repo changed)", code="repo_invalid")


_REPOS: dict[str, Any] = {}


# -- offline evaluation --------------------------------------------------------------------------
def evaluate_encoders(
    encoders: Sequence[Encoder],
    entities: pa.Array,
    at_us: np.ndarray,
    *,
    facts: Mapping[str, pa.Table],
    snapshots: Mapping[str, pa.Table],
    knowledge: str,
    entity_cols: Mapping[str, str],
) -> dict[str, tuple[pa.Array, np.ndarray]]:
    """Run ``encoders`` for every query row on the reconstructed as-of views.

    See the module docstring for the exact contract of each argument.

    Returns:
        Encoder name → (values, status), aligned with the query rows.
    """
    if isinstance(at_us, pa.ChunkedArray | pa.Array):
        at_us = at_us.cast(pa.int64()).to_numpy(zero_copy_only=False)
    at_us = np.asarray(at_us, dtype=np.int64)
    if isinstance(entities, pa.ChunkedArray):
        entities = entities.combine_chunks()
    n = len(at_us)
    found: dict[tuple[str, int | None], tuple[pa.Table, np.ndarray, np.ndarray]] = {}
    for enc in encoders:
        for inp in enc.fact_inputs:
            k = (inp.fact_type, inp.span_us)
            if k not in found:
                found[k] = visible_positions(
                    facts[inp.fact_type], entity_cols[inp.fact_type], entities, at_us,
                    span_us=inp.span_us, knowledge=knowledge)
    flat: dict[tuple[str, int | None], tuple[pa.Table, np.ndarray]] = {}
    sources: dict[tuple[str, int | None], RowSource] = {}
    out: dict[str, tuple[pa.Array, np.ndarray]] = {}
    for enc in encoders:
        snaps = {s: snapshots[s] for s in enc.services}
        result = None
        if enc.batch_fn is not None:
            for i in enc.fact_inputs:
                k = (i.fact_type, i.span_us)
                if k not in flat:
                    table, pos, off = found[k]
                    flat[k] = (table.take(pa.array(pos, pa.int64())), off)
            mine = {(i.fact_type, i.window): flat[(i.fact_type, i.span_us)]
                    for i in enc.fact_inputs}
            result = _run_batch(enc, Batch(entities, at_us, mine, snaps, knowledge), n)
        if result is None:
            for i in enc.fact_inputs:
                k = (i.fact_type, i.span_us)
                if k not in sources:
                    sources[k] = RowSource(*found[k], enc.json_fields.get(i.fact_type, ()))
            rows = {(i.fact_type, i.window): sources[(i.fact_type, i.span_us)]
                    for i in enc.fact_inputs}
            result = _run_rows(enc, entities, at_us, rows, snaps, knowledge)
        out[enc.name] = result
    return out


def _run_batch(enc: Encoder, batch: Batch, n: int) -> tuple[pa.Array, np.ndarray] | None:
    assert enc.batch_fn is not None
    try:
        got = enc.batch_fn(batch)
        if isinstance(got, pa.ChunkedArray):
            got = got.combine_chunks()
        arr = got if isinstance(got, pa.Array) else pa.array(got)
        if enc.output_type is not None and arr.type != enc.output_type:
            arr = arr.cast(enc.output_type)
        if len(arr) != n:
            return None
    except Exception:
        return None  # the row form tells which values fail
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    status = np.where(valid, "ok", "missing").astype(object)
    if not valid.all():
        snap_status = [batch.snapshot_status(s).to_numpy(zero_copy_only=False)
                       for s in enc.services]
        for st in reversed(snap_status):
            hit = ~valid & np.isin(st, _STATUS_FROM_SNAPSHOT)
            status[hit] = st[hit]
    return arr, status


def _run_rows(
    enc: Encoder, entities: pa.Array, at_us: np.ndarray,
    rows: Mapping[tuple[str, str | None], RowSource],
    snaps: Mapping[str, pa.Table], knowledge: str,
) -> tuple[pa.Array, np.ndarray]:
    n = len(at_us)
    keys = entities.to_pylist()
    snap_status = {s: t.column("status").to_pylist() for s, t in snaps.items()}
    snap_json = {s: t.column("raw_json").to_pylist() for s, t in snaps.items()}
    values: list[Any] = [None] * n
    status = np.full(n, "ok", dtype=object)
    for q in range(n):
        fview = {key: src.rows(q) for key, src in rows.items()}
        payloads = {s: (json.loads(snap_json[s][q]) if snap_status[s][q] == "ok"
                        and snap_json[s][q] is not None else None) for s in snaps}
        statuses = {s: snap_status[s][q] for s in snaps}
        view = View(keys[q], int(at_us[q]), facts=fview, snapshots=payloads,
                    snapshot_statuses=statuses, knowledge=knowledge, restricted=True)
        try:
            v = enc.fn(view)
        except Exception:
            status[q] = "error"
            continue
        if v is None:
            status[q] = _none_status(view, enc.services)
        else:
            values[q] = v
    return _to_array(enc, values, status), status


def _none_status(view: View, services: Sequence[str]) -> str:
    for s in services:
        st = view.snapshot_status(s)
        if st in _STATUS_FROM_SNAPSHOT:
            return st
    return "missing"


def _to_array(enc: Encoder, values: list[Any], status: np.ndarray) -> pa.Array:
    """The values as one Arrow array; a value that does not fit becomes an ``error``."""
    typ = enc.output_type
    if enc.output == "json":
        values = [_json_or_error(v, i, status) for i, v in enumerate(values)]
    try:
        return pa.array(values, type=typ) if typ is not None else _infer(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    if typ is None:
        typ = _infer([v for v, s in zip(values, status, strict=True) if s == "ok"][:1]).type
    fitted: list[Any] = []
    for i, v in enumerate(values):
        try:
            fitted.append(pa.array([v], type=typ)[0].as_py())
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            fitted.append(None)
            status[i] = "error"
    return pa.array(fitted, type=typ)


def json_text(value: Any) -> str:
    """The canonical JSON text of a value (what a ``json`` output column holds)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_or_error(value: Any, i: int, status: np.ndarray) -> str | None:
    if value is None:
        return None
    try:
        return json_text(value)
    except (TypeError, ValueError):
        status[i] = "error"
        return None


def _infer(values: list[Any]) -> pa.Array:
    arr = pa.array(values)
    if pa.types.is_timestamp(arr.type):
        arr = arr.cast(TIMESTAMP_TYPE)
    return arr
