"""Protocol garbage against a real `python -m server` over stdio: every line that carries an id gets
exactly one answer with that id, an unreadable one a single answer with a null id, and the server
keeps answering `ping` and `tools/list`.

Each generated line is built from a request whose expected answer is known by construction (the
oracle does not ask the transport's own screening): corrupting its params (invalid UTF-8, lone
surrogate escapes, deep nesting, NaN, a params value that is not an object) keeps its id readable;
a bad id, a batch, a bare value or random bytes leave none; a cut-off line may be answered with its
id or with null, never both, never another id. Valid notifications and responses get no answer.
Examples are derandomized; their count is reported on the terminal and as `fuzz_lines`.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server.sandbox.fake_dashscope import FakeDashScope
from tests.conftest import TEST_KEY, TOOL_NAMES
from tests.test_stdio import RawServer, raw_server

EXAMPLES = 300  # each sends 1 to 6 lines
EXAMPLE_BOUND = 15.0  # seconds for one example's answers; longer is a hang

Expect = Literal["result", "error", "answer", "null", "none", "null_or_id", "null_or_none"]
METHODS = ["ping", "tools/list", "prompts/list", "resources/list", "no/such/method"]
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3))
BAD_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80"]
SURROGATES = ["\\ud800", "\\udfff", "\\udc00\\ud800", "\\ud83d", "x\\ud800y"]


@dataclass(frozen=True)
class Line:
    data: bytes
    expect: Expect
    id: int | str | None = None
    kind: str = ""


@dataclass
class Harness:
    portal: BlockingPortal
    server: RawServer
    fake: FakeDashScope
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    seen: int = 0  # answers already accounted for
    counts: Counter[str] = field(default_factory=Counter)

    def run(self, lines: list[Line]) -> None:
        self.counts.update(line.kind for line in lines)
        self.portal.call(self._check, lines)

    async def _check(self, lines: list[Line]) -> None:
        sentinel = f"sentinel-{next(self.ids)}"
        waited = {line.id for line in lines if line.expect in ("result", "error", "answer")}
        try:
            with anyio.fail_after(EXAMPLE_BOUND):
                await self.server.send(*(line.data for line in lines), _request(sentinel, "ping"))
                await self.server.read_until(
                    lambda got: {sentinel, *waited} <= {a.get("id") for a in got[self.seen :] if "id" in a}
                )
        except TimeoutError:
            answered = {json.dumps(a.get("id")) for a in self.server.answers[self.seen :]}
            missing = [line.kind for line in lines if line.id in waited and json.dumps(line.id) not in answered]
            pytest.fail(f"no answer within {EXAMPLE_BOUND} s to: {missing or 'the ping after them'}")
        answers = self.server.answers[self.seen :]
        self.seen = len(self.server.answers)
        by_id = Counter(json.dumps(a.get("id")) for a in answers)
        shown = [line.data[:120] for line in lines]
        assert all(a.get("jsonrpc") == "2.0" and ("result" in a) != ("error" in a) for a in answers), answers
        nulls = by_id.pop("null", 0)
        assert by_id.pop(json.dumps(sentinel)) == 1
        possible_nulls = 0
        for line in lines:
            key = json.dumps(line.id)
            got = by_id.pop(key, 0) if line.id is not None else 0
            answer = next((a for a in answers if a.get("id") == line.id), None)
            if line.expect in ("result", "error", "answer"):
                assert got == 1, f"{got} answers to {line.kind} {shown}"
                assert answer is not None and (line.expect == "answer" or line.expect in answer), (line.kind, answer)
                if "error" in answer:
                    assert answer["error"]["message"] and "Traceback" not in answer["error"]["message"]
            elif line.expect == "null_or_id":
                assert got <= 1, f"{got} answers to a cut-off line {shown}"
                possible_nulls += 1 - got
            elif line.expect == "null_or_none":
                possible_nulls += 1
        expected_nulls = sum(1 for line in lines if line.expect == "null")
        assert expected_nulls <= nulls <= expected_nulls + possible_nulls, f"{nulls} null-id answers to {shown}"
        assert by_id == Counter(), f"answers with ids nobody sent: {by_id} after {shown}"


def _request(message_id: Any, method: str, params: Any = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": message_id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


@contextmanager
def harness(tmp_path: Path) -> Iterator[Harness]:
    with start_blocking_portal("asyncio") as portal:
        fake = FakeDashScope(api_key=TEST_KEY, polls_to_finish=1)
        with (
            portal.wrap_async_context_manager(fake.serve()),
            portal.wrap_async_context_manager(raw_server(fake, tmp_path)) as server,
        ):
            portal.call(server.handshake)
            h = Harness(portal, server, fake)
            h.seen = len(server.answers)
            yield h


# ---------------------------------------------------------------------------- lines


@st.composite
def an_id(draw: st.DrawFn, n: int) -> int | str:
    """A unique id of any legal shape: small, negative, 64-bit edge, hundreds of digits, any text."""
    shape = draw(st.sampled_from(["int", "negative", "edge", "huge", "text", "long text"]))
    if shape == "int":
        return n
    if shape == "negative":
        return -n
    if shape == "edge":
        return 2**63 + n
    if shape == "huge":
        digits: int = draw(st.integers(20, 900))
        return int(10**digits) + n
    suffix = draw(TEXT) if shape == "text" else "x" * draw(st.integers(1_000, 20_000))
    return f"{n}:{suffix}"


@st.composite
def a_line(draw: st.DrawFn, ids: Iterator[int]) -> Line:
    # Unique, and always seven digits: the counter also numbers the harness's sentinels (how many is a
    # matter of timing), and a draw whose bounds followed the id's length (a cut-off line's) would make
    # the replay of a failing example differ from it (Hypothesis's FlakyStrategyDefinition).
    n = 1_000_000 + next(ids)
    message_id = draw(an_id(n))
    method = draw(st.sampled_from(METHODS))
    expect: Expect = "error" if method == "no/such/method" else "result"
    ascii_only = draw(st.booleans())

    def dumps(message: Any) -> bytes:
        return json.dumps(message, ensure_ascii=ascii_only).encode()

    def with_params(raw_params: bytes) -> bytes:
        # SDK key order (jsonrpc, id, method, params): the id is read before anything broken.
        head = dumps({"jsonrpc": "2.0", "id": message_id, "method": method})[:-1]
        return head + b', "params": ' + raw_params + b"}"

    kind = draw(
        st.sampled_from(
            [
                "valid", "valid", "shuffled keys", "crlf", "bad utf-8", "surrogate", "deep", "shallow nesting",
                "params not an object", "nan", "bad jsonrpc", "bad id", "cut off", "random bytes", "bare value",
                "batch", "notification", "bad notification", "response", "bad response", "random object",
            ]
        )
    )  # fmt: skip
    if kind == "valid":
        params = draw(st.sampled_from([None, {}, {"_meta": {"progressToken": n}}]))
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": message_id, "method": method}
        if params is not None:
            message["params"] = params
        return Line(dumps(message), expect, message_id, kind)
    if kind == "shuffled keys":
        items: list[tuple[str, Any]] = [("params", {}), ("id", message_id), ("method", method), ("jsonrpc", "2.0")]
        return Line(dumps(dict(draw(st.permutations(items)))), expect, message_id, kind)
    if kind == "crlf":
        return Line(
            b"  " + dumps({"jsonrpc": "2.0", "id": message_id, "method": method}) + b" \r", expect, message_id, kind
        )
    if kind == "bad utf-8":
        raw = b'{"x": "a' + draw(st.sampled_from(BAD_UTF8)) + b'b"}'
        return Line(with_params(raw), "error", message_id, kind)
    if kind == "surrogate":
        return Line(
            with_params(b'{"x": "' + draw(st.sampled_from(SURROGATES)).encode() + b'"}'), "error", message_id, kind
        )
    if kind == "deep":
        depth = draw(st.integers(250, 50_000))
        return Line(with_params(b'{"x": ' + b"[" * depth + b"]" * depth + b"}"), "error", message_id, kind)
    if kind == "shallow nesting":
        depth = draw(st.integers(1, 150))
        return Line(with_params(b'{"x": ' + b"[" * depth + b"]" * depth + b"}"), expect, message_id, kind)
    if kind == "params not an object":
        raw = dumps(draw(st.one_of(st.lists(SCALARS, max_size=3), TEXT, st.integers(), st.booleans())))
        return Line(with_params(raw), "error", message_id, kind)
    if kind == "nan":
        return Line(
            with_params(b'{"x": ' + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"])) + b"}"),
            "error",
            message_id,
            kind,
        )
    if kind == "bad jsonrpc":
        version = draw(st.sampled_from(["1.0", 2.0, None, "2.0 ", ""]))
        return Line(dumps({"jsonrpc": version, "id": message_id, "method": method}), "error", message_id, kind)
    if kind == "bad id":
        bad = draw(st.sampled_from([1.5, 1.0, True, False, None, [], {}, [n], {"n": n}]))
        return Line(dumps({"jsonrpc": "2.0", "id": bad, "method": method}), "null", None, kind)
    if kind == "cut off":
        whole = dumps({"jsonrpc": "2.0", "id": message_id, "method": method, "params": {"x": [1, "two", None]}})
        cut = draw(st.integers(1, len(whole) - 2))
        return Line(whole[:cut], "null_or_id", message_id, kind)
    if kind == "random bytes":
        raw = draw(st.binary(min_size=1, max_size=200)).replace(b"\n", b"")
        return Line(raw, "null_or_none", None, kind)  # none when it happens to be only whitespace
    if kind == "bare value":
        value = draw(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)))
        return Line(dumps(value), "null", None, kind)
    if kind == "batch":
        inner = [{"jsonrpc": "2.0", "id": f"{n}-batch-{i}", "method": "ping"} for i in range(draw(st.integers(0, 3)))]
        return Line(dumps(inner), "null", None, kind)  # one refusal; the inner ids are never answered
    if kind == "notification":
        name = draw(st.sampled_from(["notifications/initialized", "notifications/whatever", "notifications/cancelled"]))
        message = {"jsonrpc": "2.0", "method": name}
        if name.endswith("cancelled"):
            message["params"] = {"requestId": f"never-{n}"}
        return Line(dumps(message), "none", None, kind)
    if kind == "bad notification":
        return Line(
            dumps({"jsonrpc": "2.0", "method": "notifications/x", "params": draw(st.lists(SCALARS, max_size=2))}),
            "null",
            None,
            kind,
        )
    if kind == "response":  # an answer to a request the server never sent: dropped, never answered
        return Line(dumps({"jsonrpc": "2.0", "id": message_id, "result": {}}), "none", None, kind)
    if kind == "bad response":  # never answered with its id: that id names one of the server's requests
        return Line(dumps({"jsonrpc": "2.0", "id": message_id, "result": draw(SCALARS)}), "null", None, kind)
    # A random object: no method, no result or error.
    obj = draw(st.dictionaries(TEXT.filter(lambda k: k not in ("method", "result", "error")), ANY_JSON, max_size=4))
    return Line(dumps(obj), "null", None, kind)


def test_raw_stdio_garbage_gets_one_answer_per_line_and_the_server_keeps_serving(
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with harness(tmp_path) as h:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing example may cost a full bound
        )
        @given(data=st.data())
        def example(data: st.DataObject) -> None:
            h.run(data.draw(st.lists(a_line(h.ids), min_size=1, max_size=6)))

        example()
        final = h.portal.call(_still_serving, h.server)
        lines = sum(h.counts.values())
        upstream = list(h.fake.requests)
    assert {t["name"] for t in final["result"]["tools"]} == TOOL_NAMES
    record_property("fuzz_lines", dict(h.counts))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with capsys.disabled():
            reporter.write_line(f"fuzz stdio: {lines} lines in {EXAMPLES} examples: {dict(sorted(h.counts.items()))}")
    assert upstream == []  # nothing of it reached DashScope


async def _still_serving(server: RawServer) -> dict[str, Any]:
    with anyio.fail_after(EXAMPLE_BOUND):
        await server.send(_request("last-ping", "ping"), _request("last-list", "tools/list"))
        assert (await server.answer_to("last-ping"))["result"] == {}
        return await server.answer_to("last-list")
