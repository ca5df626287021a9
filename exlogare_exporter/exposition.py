"""`/metrics` without rendering again what did not change.

The plain client_python way rebuilds every metric family from the snapshot and formats every sample at
every scrape: at a thousand tenants that is some 200,000 samples, 18 MB of text and a gzip of it, for each
scrape. Yet the snapshot-derived families only change when a store's `version` does, or when a result
passes `max_staleness` (time alone drops it). So, per negotiated format:

- the snapshot part (each family's HELP/TYPE once, then every tenant's samples in store order) and its
  gzip stream are kept while the stores' versions are the same and nothing expired
  (`TenantState.fresh_until`); a scrape then only renders the small `live` registry (counters, process
  metrics) and appends it, continuing a copy of the cached gzip compressor, so the answer is one ordinary
  gzip stream (not concatenated gzip members, which some clients stop reading after the first);
- with a thousand tenants refreshing, the versions change between any two scrapes, so the snapshot part
  is joined again from pieces kept per tenant (`metrics.Piece`: its health, each result, its RCA
  counters): a piece is formatted again only when its value changed, so a refresh that brings the same
  numbers costs the tenant's three health lines, not its two hundred samples;
- concurrent scrapes that need a new rendering wait for the one that is making it (single flight).

The bytes are the plain way's bytes: the same encoder formats each family (`tests/test_exposition.py`
compares them across version changes and expiries). A `name[]` filter, or a format beyond the first few
seen, is served the plain way.
"""

from __future__ import annotations

import gzip
import math
import threading
import time
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .metrics import (
    ExporterMetrics,
    Piece,
    data_piece_families,
    request_piece_families,
    request_pieces,
    stream_piece_families,
    stream_pieces,
    tenant_pieces,
)
from .state import TenantState

StartResponse = Callable[..., Any]
OM_CONTENT_TYPE = "application/openmetrics-text"
EOF = b"# EOF\n"
MAX_FORMATS = 4  # distinct content types cached; the version in Accept is the client's to choose
GZIP_LEVEL = 1  # a fifteenth of level 9's time (client_python's) for 40% more bytes: 1.4 MB at 1000 tenants


@dataclass(frozen=True)
class Format:
    """A negotiated exposition format: client_python's encoder for it and its Content-Type."""

    content_type: str
    encode: Callable[[Collector], bytes]

    @property
    def openmetrics(self) -> bool:
        return self.content_type.startswith(OM_CONTENT_TYPE)

    def body(self, collector: Collector) -> bytes:
        """The encoder's output without OpenMetrics' closing `# EOF`, so parts can be joined."""
        text = self.encode(collector)
        return text.removesuffix(EOF) if self.openmetrics else text


def negotiate(accept: str | None) -> Format:
    """The format client_python would answer this `Accept` header with (OpenMetrics for Prometheus)."""
    encode, content_type = choose_encoder(accept or "")
    return Format(content_type, encode)


@dataclass(frozen=True)
class Families:
    """Already built families, in the shape the encoders read (a collector)."""

    metrics: tuple[Metric, ...]

    def collect(self) -> Iterable[Metric]:
        return self.metrics


@dataclass(frozen=True)
class Joined:
    """Several collectors read one after the other."""

    parts: tuple[Collector, ...]

    def collect(self) -> Iterable[Metric]:
        for part in self.parts:
            yield from part.collect()


@dataclass(frozen=True)
class Section:
    """Families whose samples come item by item (one item per tenant, from a store's snapshot) and, within
    an item, piece by piece (`metrics.Piece`: its health, each result...).

    `pieces(item, now)` are the item's pieces at `now`, in exposition order; `families(name, pieces)` builds
    every family of the section (with or without samples) from some pieces of the item called `name`, as
    the registry's collector does from whole items; `valid_until(item, now)` is when time alone would
    change the item's pieces.
    """

    version: Callable[[], int]
    items: Callable[[], Mapping[str, Any]]
    pieces: Callable[[Any, float], list[Piece]]
    families: Callable[[str, list[Piece]], list[Metric]]
    valid_until: Callable[[Any, float], float] = lambda item, now: math.inf


def sections_of(metrics: ExporterMetrics) -> tuple[Section, ...]:
    """The snapshot-derived part of the exporter's registry, in the registry's order."""
    return (
        Section(lambda: metrics.store.version, metrics.store.snapshot, tenant_pieces, data_piece_families,
                TenantState.fresh_until),
        Section(lambda: metrics.streams.version, metrics.streams.snapshot,
                lambda item, now: stream_pieces(item),
                lambda name, pieces: stream_piece_families((name, piece) for piece in pieces)),
        Section(lambda: metrics.requests.version, metrics.requests.snapshot,
                lambda item, now: request_pieces(item),
                lambda name, pieces: request_piece_families((name, piece) for piece in pieces)),
    )


# (family index, sample lines), for the families with samples
Parts = tuple[tuple[int, tuple[bytes, ...]], ...]


@dataclass
class _Rendered:
    """One piece's samples, per format."""

    value: Any
    parts: dict[str, Parts] = field(default_factory=dict)


@dataclass
class _Item:
    """One item's pieces, and per format all its samples gathered by family, while the item object is the
    same and nothing of it expired (`at <= now < until`)."""

    item: Any
    at: float
    until: float
    pieces: dict[Hashable, _Rendered]
    parts: dict[str, Parts] = field(default_factory=dict)

    def valid(self, item: Any, now: float) -> bool:
        return self.item is item and self.at <= now < self.until


@dataclass
class _Body:
    """The snapshot part for one format: its chunks in order (the pieces' own bytes, not a copy), and, once
    a scrape asked for gzip, its gzip stream so far, open for the live part."""

    key: tuple[int, ...]
    at: float
    until: float
    chunks: tuple[bytes, ...]
    gzip_prefix: bytes = b""
    compressor: Any = None  # zlib.Compress after `chunks`, copied by each gzip scrape

    def valid(self, key: tuple[int, ...], now: float) -> bool:
        return self.key == key and self.at <= now < self.until


class CachedExposition:
    """The `/metrics` WSGI app: the snapshot part cached (see the module docstring), `live` per scrape."""

    def __init__(self, sections: tuple[Section, ...], live: Collector, plain: Collector,
                 clock: Callable[[], float] = time.time, gzip_level: int = GZIP_LEVEL) -> None:
        """`plain` is the whole registry (for `name[]` filters and formats beyond `MAX_FORMATS`); `clock`
        must be the one the sections' families are built with."""
        self._sections = sections
        self._live = live
        self._plain = plain
        self._clock = clock
        self._gzip_level = gzip_level
        self._lock = threading.Lock()  # one rendering at a time: the single flight
        self._bodies: dict[str, _Body] = {}
        self._items: list[dict[str, _Item]] = [{} for _ in sections]
        self._headers: dict[tuple[int, str], tuple[bytes, ...]] = {}
        self._formats: set[str] = set()
        self.renders = 0  # joined snapshot parts rendered (for tests and the benchmark)

    @classmethod
    def for_metrics(cls, metrics: ExporterMetrics) -> CachedExposition:
        return cls(sections_of(metrics), metrics.live, metrics.registry, metrics.clock)

    # --- WSGI ----------------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        fmt = negotiate(environ.get("HTTP_ACCEPT"))
        compress = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or "")
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        chunks = self.render(fmt, compress, names)
        headers = [("Content-Type", fmt.content_type), ("Content-Length", str(sum(map(len, chunks))))]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return chunks

    def render(self, fmt: Format, compress: bool = False, names: list[str] | None = None) -> list[bytes]:
        """The whole exposition as chunks to send in order (one gzip stream when `compress`)."""
        if names is not None or not self._cacheable(fmt):
            return [self._plain_render(fmt, compress, names)]
        body = self._body(fmt, compress)
        live = fmt.encode(self._live)
        if not compress:
            return [b"".join((*body.chunks, live))]
        compressor = body.compressor.copy()
        return [body.gzip_prefix, compressor.compress(live) + compressor.flush()]

    def _plain_render(self, fmt: Format, compress: bool, names: list[str] | None) -> bytes:
        collector: Collector = self._plain
        if names is not None:
            parts = [c.restricted_registry(names) for c in (self._plain, self._live)
                     if isinstance(c, CollectorRegistry)]
            collector = Joined(tuple(parts))
        text = fmt.encode(collector)
        return gzip.compress(text, self._gzip_level) if compress else text

    def _cacheable(self, fmt: Format) -> bool:
        if fmt.content_type in self._formats:
            return True
        with self._lock:
            if len(self._formats) < MAX_FORMATS:
                self._formats.add(fmt.content_type)
            return fmt.content_type in self._formats

    # --- the snapshot part ---------------------------------------------------------------------------------

    def _key(self) -> tuple[int, ...]:
        return tuple(section.version() for section in self._sections)

    def _body(self, fmt: Format, compress: bool) -> _Body:
        body = self._bodies.get(fmt.content_type)
        if body is None or not body.valid(self._key(), self._clock()) or (compress and not body.compressor):
            with self._lock:
                # Read the versions before the snapshots: a store that changes in between is rendered
                # newer than its key says, and the next scrape renders it again; never the other way round.
                key, now = self._key(), self._clock()
                body = self._bodies.get(fmt.content_type)
                if body is None or not body.valid(key, now):
                    chunks, until = self._join(fmt, now)
                    body = _Body(key, now, until, chunks)
                    self._bodies = {**{f: b for f, b in self._bodies.items() if b.key == key},
                                    fmt.content_type: body}
                    self.renders += 1
                if compress and not body.compressor:
                    compressor = zlib.compressobj(self._gzip_level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                    body.gzip_prefix = compressor.compress(b"".join(body.chunks))  # one call: faster
                    body.compressor = compressor
        return body

    def _join(self, fmt: Format, now: float) -> tuple[tuple[bytes, ...], float]:
        """Every section's families: HELP/TYPE once, then each item's samples in store order."""
        chunks: list[bytes] = []
        until = math.inf
        for index, section in enumerate(self._sections):
            headers = self._section_headers(index, fmt)
            columns: list[list[bytes]] = [[] for _ in headers]
            cache, kept = self._items[index], {}
            for name, item in section.items().items():
                entry = cache.get(name)
                if entry is None or not entry.valid(item, now):
                    entry = self._item(section, name, item, now, entry)
                parts = entry.parts.get(fmt.content_type)
                if parts is None:
                    parts = self._item_parts(section, name, entry, fmt, headers)
                    entry.parts[fmt.content_type] = parts
                for column, lines in parts:
                    columns[column].extend(lines)
                until = min(until, entry.until)
                kept[name] = entry
            self._items[index] = kept  # a removed tenant goes with its pieces
            for header, column in zip(headers, columns, strict=True):
                chunks.append(header)
                chunks.extend(column)
        return tuple(chunks), until

    @staticmethod
    def _item(section: Section, name: str, item: Any, now: float, old: _Item | None) -> _Item:
        """A new or changed item (or one whose result expired): its pieces, reusing those of equal value."""
        previous = old.pieces if old is not None else {}
        pieces: dict[Hashable, _Rendered] = {}
        for key, value in section.pieces(item, now):
            rendered = previous.get(key)
            if rendered is None or not (rendered.value is value or rendered.value == value):
                rendered = _Rendered(value)
            pieces[key] = rendered
        return _Item(item, now, section.valid_until(item, now), pieces)

    @staticmethod
    def _item_parts(section: Section, name: str, entry: _Item, fmt: Format,
                    headers: tuple[bytes, ...]) -> Parts:
        """The item's sample lines by family, formatting only the pieces not formatted before."""
        columns: dict[int, list[bytes]] = {}
        for key, rendered in entry.pieces.items():
            parts = rendered.parts.get(fmt.content_type)
            if parts is None:
                families = section.families(name, [(key, rendered.value)])
                parts = rendered.parts[fmt.content_type] = _split(families, fmt, headers)
            for column, lines in parts:
                columns.setdefault(column, []).extend(lines)
        return tuple((column, tuple(lines)) for column, lines in sorted(columns.items()))

    def _section_headers(self, index: int, fmt: Format) -> tuple[bytes, ...]:
        """Each family's HELP and TYPE lines: what the encoder writes for it without samples."""
        key = (index, fmt.content_type)
        if key not in self._headers:
            self._headers[key] = tuple(fmt.body(Families((family,)))
                                       for family in self._sections[index].families("", []))
        return self._headers[key]


def _split(families: list[Metric], fmt: Format, headers: tuple[bytes, ...]) -> Parts:
    """The sample lines of each family that has samples, as the encoder writes them after its header.

    One encoder call for all the families; the output is cut at the headers, which are known and can only
    start a line (a sample line starts with a metric name, and label values escape their newlines)."""
    if len(families) != len(headers):
        raise ValueError(f"a section built {len(families)} families, expected {len(headers)}")
    used = [(index, family) for index, family in enumerate(families) if family.samples]
    text = fmt.body(Families(tuple(family for _, family in used)))
    parts = []
    position = 0
    for number, (index, family) in enumerate(used):
        header = headers[index]
        if not text.startswith(header, position):
            raise ValueError(f"family {family.name}: the encoder's header changed with its samples")
        start = position + len(header)
        position = text.index(headers[used[number + 1][0]], start) if number + 1 < len(used) else len(text)
        parts.append((index, (text[start:position],)))
    return tuple(parts)
