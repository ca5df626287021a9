"""`/metrics` without rendering again what did not change.

The plain client_python way rebuilds every metric family from the snapshot and formats every sample at
every scrape: at a thousand tenants that is some 200,000 samples, 18 MB of text and a gzip of it, for each
scrape. Yet the snapshot-derived families only change when a store's `version` does, or when a result
passes `max_staleness` (time alone drops it). So:

- the snapshot part (each family's HELP/TYPE once, then every tenant's samples in store order) and its
  gzip are kept while the stores' versions are the same and nothing expired (`TenantState.fresh_until`);
  a scrape then only renders the small `live` registry (counters, process metrics) and appends it;
- with a thousand tenants refreshing, the versions change between any two scrapes, so the snapshot part
  is joined again from pieces kept per tenant (`metrics.Piece`: its health, each result, its RCA
  counters): a piece is formatted again only when its value changed, so a refresh that brings the same
  numbers costs the tenant's three health lines, not its two hundred samples. Pieces are formatted by
  `lines` (a template per family, not client_python's encoder: a tenth of the time), and their lines are
  the same in every format this caches (OpenMetrics and text, with legacy names); only HELP/TYPE differ;
- the gzip is one ordinary gzip stream (not concatenated members, which some clients stop reading after
  the first), cut into segments: each family's lines of `GROUP` tenants, compressed on their own (a full
  flush resets the compressor) and kept while the same pieces make them up. The scheduler spreads tenants
  over the interval in config order, so those refreshed between two scrapes are neighbours and most
  segments are reused; the CRC-32 of the text is recomputed (a few milliseconds at 18 MB);
- concurrent scrapes that need a new rendering wait for the one that is making it (single flight).

The bytes are the plain way's bytes (`tests/test_exposition.py` compares them across version changes and
expiries, `tests/test_lines.py` the line formatting). A `name[]` filter, an escaping that rewrites legacy
names, or a format beyond the first few seen, is served the plain way.
"""

from __future__ import annotations

import gzip
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from .lines import LineCounter, LineFamily, LineGauge, LineHistogram
from .metrics import ExporterMetrics, Kinds, Piece, Section

try:  # ISA-L's deflate and CRC-32: at level 1 twice zlib's speed in segments, four times its CRC's
    from isal import isal_zlib as fast_zlib
except ImportError:  # a platform without its wheel: zlib, the same bytes' meaning, slower
    fast_zlib = zlib

StartResponse = Callable[..., Any]
OM_CONTENT_TYPE = "application/openmetrics-text"
EOF = b"# EOF\n"
MAX_FORMATS = 4  # distinct content types cached; the version in Accept is the client's to choose
GZIP_LEVEL = 1  # against client_python's 9: a fraction of the time for a third more bytes (1.0 → 1.35 MB)
GROUP = 32  # tenants per gzip segment: smaller reuses more after a few refreshes, larger compresses better
LEGACY_ESCAPINGS = ("underscores", "allow-utf-8")  # keep legacy names as they are: `lines` applies
# A gzip member's header (RFC 1952): deflate, no name, no time, unknown OS; the segments follow.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True)
class Format:
    """A negotiated exposition format: client_python's encoder for it and its Content-Type."""

    content_type: str
    encode: Callable[[Collector], bytes]

    @property
    def openmetrics(self) -> bool:
        return self.content_type.startswith(OM_CONTENT_TYPE)

    @property
    def legacy_names(self) -> bool:
        """Whether the format writes legacy names unchanged (`dots` and `values` rewrite underscores)."""
        escaping = self.content_type.partition("escaping=")[2].split(";")[0].strip()
        return escaping in ("", *LEGACY_ESCAPINGS)

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


# (family index, sample lines), for the families with samples; the same in every cached format
Parts = tuple[tuple[int, bytes], ...]


@dataclass
class _Rendered:
    """One piece's value and, once formatted, its samples."""

    value: Any
    parts: Parts | None = None


@dataclass
class _Item:
    """One item's pieces, and all its samples gathered by family, while the item object is the same and
    nothing of it expired (`at <= now < until`)."""

    item: Any
    at: float
    until: float
    pieces: dict[Hashable, _Rendered]
    parts: Parts | None = None

    def valid(self, item: Any, now: float) -> bool:
        return self.item is item and self.at <= now < self.until


# Per (section, family index), its samples in groups of `GROUP` items: a group is a gzip segment's text.
Columns = tuple[tuple[tuple[int, int], tuple[tuple[bytes, ...], ...]], ...]


@dataclass(frozen=True)
class _Layout:
    """The snapshot part, format aside: the stores' versions it was made at and until when it holds."""

    key: tuple[int, ...]
    at: float
    until: float
    columns: Columns

    def valid(self, key: tuple[int, ...], now: float) -> bool:
        return self.key == key and self.at <= now < self.until


@dataclass
class _Body:
    """The snapshot part in one format: its chunks in order (the pieces' own bytes, not a copy), and, once
    a scrape asked for gzip, the gzip stream so far (header and segments) with its text's CRC-32 and
    length, for the live part to end."""

    layout: _Layout
    chunks: tuple[bytes, ...]
    gzip: tuple[bytes, int, int] | None = None


@dataclass(frozen=True)
class _Segment:
    """Some chunks' raw deflate, ending in a full flush so it can follow any other. The chunks are kept to
    compare (mostly the same objects; an item that changed joins its unchanged families' bytes again)."""

    chunks: tuple[bytes, ...]
    deflated: bytes


class CachedExposition:
    """The `/metrics` WSGI app: the snapshot part cached (see the module docstring), `live` per scrape."""

    def __init__(self, sections: tuple[Section, ...], live: Collector, plain: Collector,
                 clock: Callable[[], float] = time.time, *, gzip_level: int = GZIP_LEVEL,
                 deflate: ModuleType = fast_zlib) -> None:
        """`plain` is the whole registry (for `name[]` filters and formats beyond `MAX_FORMATS`); `clock`
        must be the one the sections' families are built with; `deflate` is `zlib` or a module with its
        `compressobj` and `crc32`."""
        self._sections = sections
        self._live = live
        self._plain = plain
        self._clock = clock
        self._gzip_level = gzip_level
        self._zlib = deflate
        self._lock = threading.Lock()  # one rendering at a time: the single flight
        self._layout: _Layout | None = None
        self._bodies: dict[str, _Body] = {}
        self._items: list[dict[str, _Item]] = [{} for _ in sections]
        self._segments: dict[Hashable, _Segment] = {}
        self._headers: dict[tuple[int, str], tuple[bytes, ...]] = {}
        self._formats: set[str] = set()
        self.renders = 0  # snapshot parts joined again (for tests and the benchmark)
        self.deflated = 0  # gzip segments compressed again (idem)

    @classmethod
    def for_metrics(cls, metrics: ExporterMetrics) -> CachedExposition:
        return cls(metrics.sections, metrics.live, metrics.registry, metrics.clock)

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
        prefix, crc, size = body.gzip  # type: ignore[misc]
        deflate = self._zlib.compressobj(self._gzip_level, zlib.DEFLATED, -zlib.MAX_WBITS)
        trailer = struct.pack("<II", self._zlib.crc32(live, crc), (size + len(live)) & 0xFFFFFFFF)
        return [prefix, deflate.compress(live) + deflate.flush() + trailer]

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
        if not fmt.legacy_names:
            return False
        with self._lock:
            if len(self._formats) < MAX_FORMATS:
                self._formats.add(fmt.content_type)
            return fmt.content_type in self._formats

    # --- the snapshot part ---------------------------------------------------------------------------------

    def _key(self) -> tuple[int, ...]:
        return tuple(section.store.version for section in self._sections)

    def _body(self, fmt: Format, compress: bool) -> _Body:
        body = self._bodies.get(fmt.content_type)
        if body is None or not body.layout.valid(self._key(), self._clock()) or (compress and not body.gzip):
            with self._lock:
                # Read the versions before the snapshots: a store that changes in between is rendered
                # newer than its key says, and the next scrape renders it again; never the other way round.
                key, now = self._key(), self._clock()
                if self._layout is None or not self._layout.valid(key, now):
                    self._layout = self._join(key, now)
                    self.renders += 1
                body = self._bodies.get(fmt.content_type)
                if body is None or body.layout is not self._layout:
                    body = _Body(self._layout, self._chunks(self._layout, fmt))
                    self._bodies = {**{f: b for f, b in self._bodies.items() if b.layout is self._layout},
                                    fmt.content_type: body}
                if compress and not body.gzip:
                    body.gzip = self._gzip(body.layout, fmt)
        return body

    def _join(self, key: tuple[int, ...], now: float) -> _Layout:
        """Every section's families, each item's samples in store order, in groups of `GROUP` items."""
        columns: list[tuple[tuple[int, int], tuple[tuple[bytes, ...], ...]]] = []
        until = math.inf
        for index, section in enumerate(self._sections):
            count = len(section.describe())
            groups: list[list[list[bytes]]] = [[] for _ in range(count)]
            cache, kept = self._items[index], {}
            for position, (name, item) in enumerate(section.store.snapshot().items()):
                entry = cache.get(name)
                if entry is None or not entry.valid(item, now):
                    entry = self._item(section, item, now, entry)
                if entry.parts is None:
                    entry.parts = self._item_parts(section, name, entry, count)
                if position % GROUP == 0:
                    for family in groups:
                        family.append([])
                for column, lines in entry.parts:
                    groups[column][-1].append(lines)
                until = min(until, entry.until)
                kept[name] = entry
            self._items[index] = kept  # a removed tenant goes with its pieces
            columns.extend(((index, column), tuple(map(tuple, family)))
                           for column, family in enumerate(groups))
        return _Layout(key, now, until, tuple(columns))

    @staticmethod
    def _item(section: Section, item: Any, now: float, old: _Item | None) -> _Item:
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
    def _item_parts(section: Section, name: str, entry: _Item, count: int) -> Parts:
        """The item's sample lines by family, formatting only the pieces not formatted before."""
        todo = [(key, rendered) for key, rendered in entry.pieces.items() if rendered.parts is None]
        if todo:
            _format(section, name, todo, count)
        columns: dict[int, list[bytes]] = {}
        for rendered in entry.pieces.values():
            for column, lines in rendered.parts or ():
                columns.setdefault(column, []).append(lines)
        return tuple((column, b"".join(lines)) for column, lines in sorted(columns.items()))

    def _chunks(self, layout: _Layout, fmt: Format) -> tuple[bytes, ...]:
        chunks: list[bytes] = []
        for (section, column), groups in layout.columns:
            chunks.append(self._section_headers(section, fmt)[column])
            for group in groups:
                chunks.extend(group)
        return tuple(chunks)

    def _gzip(self, layout: _Layout, fmt: Format) -> tuple[bytes, int, int]:
        """The gzip header and every segment, compressing again only those whose chunks changed."""
        deflate = self._zlib.compressobj(self._gzip_level, zlib.DEFLATED, -zlib.MAX_WBITS)
        crc32, full_flush = self._zlib.crc32, self._zlib.Z_FULL_FLUSH
        out, crc, size = [GZIP_HEADER], 0, 0
        segments: dict[Hashable, _Segment] = {}
        for (section, column), groups in layout.columns:
            header = self._section_headers(section, fmt)[column]
            for key, chunks in (((fmt.content_type, section, column), (header,)),
                                *(((section, column, n), group) for n, group in enumerate(groups))):
                if not chunks:
                    continue
                segment = self._segments.get(key)
                if segment is None or segment.chunks != chunks:
                    text = b"".join(chunks)
                    segment = _Segment(chunks, deflate.compress(text) + deflate.flush(full_flush))
                    self.deflated += 1
                segments[key] = segment
                out.append(segment.deflated)
                for chunk in chunks:
                    crc = crc32(chunk, crc)
                    size += len(chunk)
        # Other formats' header segments are dropped; theirs are a few hundred bytes to compress again.
        self._segments = segments
        return b"".join(out), crc, size

    def _section_headers(self, index: int, fmt: Format) -> tuple[bytes, ...]:
        """Each family's HELP and TYPE lines: what the encoder writes for it without samples."""
        key = (index, fmt.content_type)
        if key not in self._headers:
            self._headers[key] = tuple(fmt.body(Families((family,)))
                                       for family in self._sections[index].describe())
        return self._headers[key]


def _format(section: Section, name: str, todo: list[tuple[Hashable, _Rendered]], count: int) -> None:
    """Sets the pieces' `parts`: one call of the section's builder for them all (a call per piece would
    build every family again each time), its lines cut where each piece ends, noted as the builder asks
    for the next piece."""
    made: list[LineFamily] = []

    def recording(kind: type[LineFamily]) -> Callable[..., LineFamily]:
        def make(*args: Any, **kwargs: Any) -> LineFamily:
            made.append(family := kind(*args, **kwargs))
            return family
        return make

    ends: list[list[int]] = []

    def pieces() -> Iterator[tuple[str, Piece]]:
        for key, rendered in todo:
            yield name, (key, rendered.value)
            ends.append([len(family.lines) for family in made])

    kinds = Kinds(*map(recording, (LineGauge, LineCounter, LineHistogram)))
    families = section.families(pieces(), kinds)
    if len(families) != count or len(ends) != len(todo) or any(len(end) != len(made) for end in ends):
        raise ValueError(f"a section built {len(families)} families of {len(ends)} pieces, expected {count} "
                         f"of {len(todo)}")
    columns = [made.index(family) for family in families]
    start = [0] * len(made)
    for (_, rendered), end in zip(todo, ends, strict=True):
        rendered.parts = tuple((column, "".join(families[column].lines[start[index]:end[index]]).encode())
                               for column, index in enumerate(columns) if end[index] > start[index])
        start = end
