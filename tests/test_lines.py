"""`lines`: the sample lines client_python's encoders write, byte for byte, without building `Sample`s."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exlogare_exporter.exposition import Families, negotiate
from exlogare_exporter.lines import LineCounter, LineFamily, LineGauge, LineHistogram, template, value_text
from exlogare_exporter.metrics import (
    CLIENT,
    Kinds,
    TenantRequests,
    data_piece_families,
    request_piece_families,
    request_pieces,
    stream_piece_families,
    stream_pieces,
    tenant_pieces,
)
from tests import synthetic
from tests.test_exposition import ACCEPTS, NOW

LINES = Kinds(LineGauge, LineCounter, LineHistogram)
FORMATS = [negotiate(accept) for accept in ACCEPTS.values()]
# Label values: any text UTF-8 can carry (lone surrogates cannot be encoded by either side).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
VALUES = st.one_of(st.floats(), st.integers(-10**20, 10**20), st.sampled_from([0, 1e6, 999_999, 1_000_000,
                                                                                 -0.0, 1e-7, 123456.5]))


def client_lines(family: object) -> set[bytes]:
    """What each format's client_python encoder writes for the family after its HELP/TYPE."""
    out = set()
    for fmt in FORMATS:
        text = fmt.body(Families((family,)))  # type: ignore[arg-type]
        out.add(b"".join(line + b"\n" for line in text.split(b"\n") if line and not line.startswith(b"# ")))
    return out


def assert_same(client: list[object], lines: list[LineFamily]) -> None:
    assert len(client) == len(lines)
    for ours, theirs in zip(lines, client, strict=True):
        assert (ours.name, ours.type) == (theirs.name, theirs.type)  # type: ignore[attr-defined]
        assert client_lines(theirs) == {"".join(ours.lines).encode()}, ours.name


def test_every_family_of_the_exporter_formats_as_client_python_does() -> None:
    state = synthetic.tenant_state("t0001", NOW)
    pieces = [("t0001", piece) for piece in tenant_pieces(state, NOW)]
    assert_same(data_piece_families(pieces), data_piece_families(pieces, LINES))
    stream = synthetic.tenant_stream("t0001", NOW)
    pieces = [("t0001", piece) for piece in stream_pieces(stream, NOW)]
    assert_same(stream_piece_families(pieces), stream_piece_families(pieces, LINES))
    requests = TenantRequests("t0001", {("overview", "200"): 3, ("analyses", "timeout"): 1})
    pieces = [("t0001", piece) for piece in request_pieces(requests, NOW)]
    assert_same(request_piece_families(pieces), request_piece_families(pieces, LINES))
    assert len(request_piece_families(pieces, LINES)[0].lines) == 2


@settings(max_examples=300, deadline=None)
@given(labels=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4), values=st.lists(VALUES, min_size=4,
                                                                                       max_size=4))
def test_awkward_label_values_and_every_kind_of_number(labels: list[tuple[str, str]],
                                                       values: list[float]) -> None:
    names = ["tenant", "window"]
    gauge, counter = CLIENT.gauge("g_seconds", "h", labels=names), CLIENT.counter("c", "h", labels=names)
    ours = [LineGauge("g_seconds", "h", labels=names), LineCounter("c", "h", labels=names)]
    for (first, second), value in zip(labels, values, strict=False):
        for family in (gauge, counter, *ours):
            family.add_metric([first, second], value)
    assert_same([gauge, counter], ours)
    histogram, line_histogram = (kind("h", "h", labels=["a"]) for kind in (CLIENT.histogram, LineHistogram))
    bounds = sorted({abs(v) for v in values if isinstance(v, int) or math.isfinite(v)})
    buckets = [*((value_text(b), float(n)) for n, b in enumerate(bounds)), ("+Inf", float(len(bounds)))]
    for family in (histogram, line_histogram):
        family.add_metric([labels[0][0]], buckets, values[0])
    assert_same([histogram], [line_histogram])


@given(names=st.lists(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: not n.startswith("__")), min_size=1, max_size=5, unique=True), value=TEXT)
def test_samples_with_their_own_label_names(names: list[str], value: str) -> None:
    client, ours = CLIENT.counter("rcas", "h"), LineCounter("rcas", "h")
    for family in (client, ours):
        family.add_sample("rcas_total", {name: f"{value}{n}" for n, name in enumerate(names)}, 7)
    assert_same([client], [ours])


@pytest.mark.parametrize(("sample", "labels"), [("a.b", ()), ("9lives", ()), ("ok", ("bad-label",)),
                                                 ("ok", ("__reserved",)), ("ok", ("x", "x"))])
def test_names_the_template_cannot_write_as_client_python_would_are_refused(sample: str,
                                                                            labels: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        template(sample, labels)
