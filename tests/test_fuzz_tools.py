"""Property-based fuzzing of every tool's arguments, through a real MCP session against the fake.

The oracle is the published input schema (`tools/list`, checked with `jsonschema`): an input the
schema refuses must be refused by the server, with a tool error, and nothing of it may reach the
fake. An input the schema accepts gets a result or an actionable tool error, never a protocol
error, an opaque "Error executing tool" or a traceback. Whatever was sent, a generate reaches the
fake only with the boxes of a passing detection of the same image (the fake refuses any other and
creates no task, so every submit it saw must have become a task). Every call is bounded, and the
server must still list its tools after each one.

Examples are derandomized (the same inputs on every run) and counted; the counts are reported on
the terminal and as the `fuzz_examples` property of the test.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from mcp import Client
from mcp.shared.exceptions import MCPError

from server.app import create_app
from server.config import load_settings
from server.sandbox.fake_dashscope import FakeDashScope, RecordedRequest
from tests.conftest import OTHER_PORTRAIT, PORTRAIT, SPEECH, TEST_KEY, TOOL_NAMES, make_env, text_of

# Examples per tool. The emoji models are limited to 1 call/s upstream (server/upstream/limits.py), so
# their strategies reach the fake rarely; the rest is refused locally in milliseconds.
EXAMPLES = {
    "emo_detect": 70,
    "emoji_detect": 40,
    "emo_generate": 90,
    "emoji_generate": 60,
    "task_status": 60,
    "task_cancel": 40,
}
CALL_BOUND = 30.0  # seconds; a call that takes longer is a hang

URLS = [PORTRAIT, OTHER_PORTRAIT, "https://images.example.com/people/noface.jpg", "http://images.example.com/c.png"]
SPEECHES = [SPEECH, "https://audio.example.com/people/long-speech.mp3"]
ODD_MEDIA = [
    "",
    " ",
    "https://",
    "https:///a.jpg",
    "ftp://images.example.com/a.jpg",
    "javascript:alert(1)",
    "data:image/png;base64,iVBORw0KGgo=",
    "//images.example.com/a.jpg",
    "file://remote.example.com/a.jpg",
    "file:///etc/passwd",
    "C:\\Users\\me\\portrait.jpg",
    "../../../../etc/shadow",
    "https://127.0.0.1/a.jpg",
    "https://[::1]/a.jpg",
    "https://user:secret@images.example.com/a.jpg",
    "https://images.example.com:99999/a.jpg",
    "https://例え.jp/肖像.jpg",
    "ｈｔｔｐｓ：／／images.example.com/a.jpg",
    "https://images.example.com/\u202egpj.exe",
    "https://images.example.com/a\u200b.jpg",
    "\ufeffhttps://images.example.com/a.jpg",
    "https://images.example.com/a\u2028b.jpg",
    "https://images.example.com/a\x85b.jpg",
    "https://images.example.com/🙂.jpg",
    "https://images.example.com/" + "a" * 2100 + ".jpg",
    "x" * 100_000,
]
CONTROL_CHARS = [chr(c) for c in range(0x20)] + ["\x7f"]
CONTROL = re.compile("[\x00-\x1f\x7f\ufffd]")  # and U+FFFD, what undecodable bytes would have become
# Pinned inputs, run before the generated ones: every odd form above, and every control character.
CORPUS = [*ODD_MEDIA, "file:///tmp/portrait%00.jpg", *(PORTRAIT[:20] + c + PORTRAIT[20:] for c in CONTROL_CHARS)]
# Fixed in server/media/sources.py on another branch (a percent-encoded NUL in a file:// URI makes
# path resolution raise, an opaque "Error executing tool"); expected to fail until that merge.
TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)
ANY_JSON = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3)
)


@dataclass
class Harness:
    """One server session for a whole fuzz run, driven from Hypothesis' (synchronous) examples."""

    portal: BlockingPortal
    client: Client
    fake: FakeDashScope
    schemas: dict[str, dict[str, Any]]
    validators: dict[str, Draft202012Validator]
    enums: dict[str, dict[str, list[Any]]]
    detections: dict[str, list[tuple[str, list[int], list[int]]]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def run(self, tool: str, arguments: dict[str, Any]) -> None:
        valid = self.validators[tool].is_valid(arguments)
        self.counts[f"{tool} {'valid' if valid else 'invalid'}"] += 1
        self.portal.call(self._check, tool, arguments, valid)

    async def _check(self, tool: str, arguments: dict[str, Any], valid: bool) -> None:
        before = len(self.fake.requests)
        with anyio.fail_after(CALL_BOUND):
            try:
                result = await self.client.call_tool(tool, arguments)
            except MCPError as exc:
                pytest.fail(f"{tool}({_shown(arguments)}) got a protocol error: {exc.code} {exc.message}")
        text = text_of(result)
        assert "Traceback" not in text, text
        if not valid:
            assert result.is_error, f"{tool} accepted what its schema refuses: {_shown(arguments)}"
            caused = [r for r in self.fake.requests[before:] if not self._background(r)]
            assert caused == [], f"{tool} sent a refused input upstream: {_shown(arguments)}"
        elif result.is_error:
            assert text.strip() != f"Error executing tool {tool}", f"opaque error for {_shown(arguments)}"
        else:
            assert result.structured_content is not None
            self._remember(tool, arguments, dict(result.structured_content))
        # Every submit the fake saw matched a passing detection of that image (else: no task).
        assert len(self.fake.submits()) == len(self.fake.tasks), "a generate was sent without provenance"
        for sent in self.fake.requests[before:]:
            for url in _media_urls(sent):
                assert not CONTROL.search(url), f"a URL with a control character was sent: {url!r}"
        with anyio.fail_after(CALL_BOUND):
            assert {t.name for t in (await self.client.list_tools()).tools} == TOOL_NAMES

    def _background(self, request: RecordedRequest) -> bool:
        """The watcher's own traffic (following submitted tasks, downloading their videos)."""
        if request.method != "GET":
            return False
        if request.path.startswith("/files/") or request.path.rstrip("/") == "/api/v1/tasks":
            return True
        return request.path.removeprefix("/api/v1/tasks/").rstrip("/") in self.fake.tasks

    def _remember(self, tool: str, arguments: dict[str, Any], result: dict[str, Any]) -> None:
        if tool.endswith("_detect") and result.get("check_pass"):
            ext = result.get("ext_bbox") or result.get("ext_bbox_face")
            entry = (str(arguments["image_url"]), list(result["face_bbox"]), list(ext or []))
            self.detections.setdefault(tool.removesuffix("_detect"), []).append(entry)
        if tool.endswith("_generate") and isinstance(result.get("task_id"), str):
            self.tasks.append(result["task_id"])


def _media_urls(request: RecordedRequest) -> list[str]:
    body = request.body if isinstance(request.body, dict) else {}
    given = body.get("input")
    if not isinstance(given, dict):
        return []
    return [value for key, value in given.items() if str(key).endswith("_url") and isinstance(value, str)]


def _shown(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=True)[:300]


@contextmanager
def harness(tmp_path: Path) -> Iterator[Harness]:
    with start_blocking_portal("asyncio") as portal:
        fake = FakeDashScope(api_key=TEST_KEY, polls_to_finish=1)
        with portal.wrap_async_context_manager(fake.serve()):
            app_settings = load_settings(make_env(fake, tmp_path), cwd=tmp_path)
            with portal.wrap_async_context_manager(Client(create_app(app_settings))) as client:
                tools = portal.call(client.list_tools).tools
                validators = {t.name: Draft202012Validator(t.input_schema) for t in tools}
                enums = {
                    t.name: {
                        name: spec["enum"]
                        for name, spec in t.input_schema["properties"].items()
                        if isinstance(spec, dict) and "enum" in spec
                    }
                    for t in tools
                }
                schemas = {t.name: dict(t.input_schema) for t in tools}
                yield Harness(portal, client, fake, schemas, validators, enums)


# ---------------------------------------------------------------------------- strategies
#
# Each argument has a strategy for values its schema accepts and one for values it may not. An
# example is "valid" (every argument from the first), "mutated" (one argument, or the set of
# keys, from the second) or "chaos" (each argument from either): the oracle, not the strategy,
# decides what must be refused.

SAFE_TEXT = st.text(st.characters(codec="ascii", categories=["L", "N"], include_characters="-_./"), max_size=24)


@dataclass(frozen=True)
class Arg:
    good: st.SearchStrategy[Any]
    bad: st.SearchStrategy[Any]


def with_control(base: str) -> st.SearchStrategy[str]:
    return st.tuples(st.integers(0, len(base)), st.sampled_from(CONTROL_CHARS)).map(
        lambda cut: base[: cut[0]] + cut[1] + base[cut[0] :]
    )


def media(good: list[str]) -> Arg:
    return Arg(
        good=st.one_of(
            st.sampled_from(good),
            st.builds(lambda path: f"https://images.example.com/{path}.jpg", SAFE_TEXT),
            SAFE_TEXT.filter(bool),  # a relative local path that does not exist
        ),
        bad=st.one_of(
            st.sampled_from(ODD_MEDIA),
            st.sampled_from(good).flatmap(with_control),
            st.builds(lambda path: f"https://images.example.com/{path}.jpg", TEXT),
            TEXT,
            ANY_JSON.filter(lambda v: not isinstance(v, str)),
        ),
    )


def box(known: list[list[int]]) -> Arg:
    return Arg(
        good=st.sampled_from(known) | st.lists(st.integers(0, 2000), min_size=4, max_size=4),
        bad=st.one_of(
            st.sampled_from(known).map(lambda b: [*b, 0]),
            st.sampled_from(known).map(lambda b: [float(v) for v in b]),
            st.sampled_from(known).map(lambda b: [str(v) for v in b]),
            st.lists(st.integers(-5, 10**12), min_size=0, max_size=6),
            st.lists(JSON_SCALARS, max_size=5),
            JSON_SCALARS,
        ),
    )


def choice_of(values: list[Any]) -> Arg:
    return Arg(st.sampled_from(values), st.sampled_from(values).map(str.upper) | TEXT | JSON_SCALARS)


def flag(mostly: bool | None = None) -> Arg:
    good = st.booleans() if mostly is None else st.sampled_from([mostly, mostly, mostly, not mostly])
    return Arg(good, st.sampled_from(["true", "false", 1, 0, None, []]))


def task_id(known: list[str]) -> Arg:
    return Arg(
        good=st.sampled_from(known or ["no-such-task"]) | st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True),
        bad=st.sampled_from(["", "../../etc/passwd", "a/b", "a" * 129, "id with spaces", "ид", "id\x00"])
        | JSON_SCALARS,
    )


WAIT = Arg(
    good=st.floats(0, 0.5) | st.integers(0, 1),
    bad=st.sampled_from([-1, -0.001, 86_400.5, 10**9, "5", True, None, [1]]),
)
EXTRA_KEYS = st.dictionaries(st.sampled_from(["seed", "ratio", "Image_url", "", "bbox", "_meta"]), ANY_JSON, min_size=1)


def shaped(draw: Callable[[st.SearchStrategy[Any]], Any], args: dict[str, Arg], required: set[str]) -> dict[str, Any]:
    """Arguments from per-argument strategies, valid, mutated once, or any mix."""
    mode = draw(st.sampled_from(["valid", "valid", "mutated", "mutated", "chaos"]))
    present = [name for name in args if name in required or draw(st.booleans())]
    mutated = draw(st.sampled_from([*present, "<missing>", "<extra>"])) if mode == "mutated" else None
    arguments: dict[str, Any] = {}
    for name in present:
        bad = name == mutated or (mode == "chaos" and draw(st.booleans()))
        arguments[name] = draw(args[name].bad if bad else args[name].good)
    if mutated == "<missing>" and arguments:
        del arguments[draw(st.sampled_from(sorted(arguments)))]
    if mutated == "<extra>" or (mode == "chaos" and draw(st.booleans())):
        arguments.update(draw(EXTRA_KEYS))
    return arguments


def model_const(h: Harness, tool: str) -> Arg:
    spec = h.schemas[tool]["properties"]["model"]
    names = [branch["const"] for branch in spec.get("anyOf", []) if "const" in branch]
    return Arg(st.sampled_from([None, *names]), st.sampled_from(names).map(str.upper) | TEXT | JSON_SCALARS)


def generated(h: Harness, tool: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> dict[str, Any]:
    enums = h.enums[tool]
    family = tool.split("_")[0]
    ext_name = "ext_bbox" if family == "emo" else "ext_bbox_face"
    if tool.endswith("_detect"):
        # emoji-detect-v1 is limited to 1 call/s upstream: its valid inputs are mostly local paths.
        good = URLS if family == "emo" else ["portrait.jpg", "people/alice.png", "missing.webp", PORTRAIT]
        args = {"image_url": media(good), "model": model_const(h, tool)}
        if family == "emo":
            args["ratio"] = choice_of(enums["ratio"])
        return shaped(draw, args, {"image_url"})
    if tool.endswith("_generate"):
        # Boxes from a real detection of the same image, of another image, or from nowhere: the
        # provenance check, not the schema, must refuse the last two before anything is sent.
        known = h.detections.get(family) or [(PORTRAIT, [1, 2, 3, 4], [5, 6, 7, 8])]
        image, face, ext = draw(st.sampled_from(known))
        images = [image, image, *(entry[0] for entry in known)]
        args = {
            "image_url": Arg(st.sampled_from(images) | media(URLS).good, media(URLS).bad),
            "face_bbox": box([face, face, *(entry[1] for entry in known)]),
            ext_name: box([ext, ext, *(entry[2] for entry in known)]),
            "model": model_const(h, tool),
            "dry_run": flag(),
            "allow_duplicate": flag(mostly=False),
        }
        if family == "emo":
            args |= {"audio_url": media(SPEECHES), "style_level": choice_of(enums["style_level"])}
        else:  # two templates at most, so identical requests deduplicate instead of billing again
            args["template_id"] = Arg(st.sampled_from(enums["template_id"][:2]), choice_of(enums["template_id"]).bad)
        return shaped(draw, args, {"image_url", "face_bbox", ext_name, "audio_url", "template_id"})
    args = {"task_id": task_id(h.tasks)}
    if tool == "task_status":
        args["wait_seconds"] = WAIT
    return shaped(draw, args, {"task_id"})


# ---------------------------------------------------------------------------- the suite


@pytest.mark.parametrize("tool", list(EXAMPLES))
def test_fuzzed_arguments_are_refused_by_schema_or_answered(
    tool: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with harness(tmp_path) as h:
        if tool.endswith("_generate"):  # one passing detection of the family, so boxes can be right
            h.run(tool.replace("_generate", "_detect"), {"image_url": PORTRAIT})
        elif tool.startswith("task_"):
            detection = h.portal.call(h.client.call_tool, "emo_detect", {"image_url": PORTRAIT})
            boxes = detection.structured_content or {}
            h.run("emo_generate", {"image_url": PORTRAIT, "audio_url": SPEECH, **_boxes(boxes)})

        @settings(
            max_examples=EXAMPLES[tool],
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(data=st.data())
        def example(data: st.DataObject) -> None:
            h.run(tool, generated(h, tool, data.draw))

        example()
        counts = {key: n for key, n in sorted(h.counts.items()) if key.startswith(tool)}
        submitted = len(h.fake.submits())
    record_property("fuzz_examples", counts)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with capsys.disabled():
            reporter.write_line(f"fuzz {tool}: {counts}, {submitted} submit(s) upstream")
    assert sum(counts.values()) >= EXAMPLES[tool]


def test_a_corpus_of_odd_media_is_refused_or_answered(
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each pinned odd URL or path, as a portrait and as speech: the same oracle as the fuzzed calls."""
    failed: dict[str, str] = {}
    with harness(tmp_path) as h:
        detection = h.portal.call(h.client.call_tool, "emo_detect", {"image_url": PORTRAIT}).structured_content
        boxes = _boxes(detection or {})
        for value in CORPUS:
            for tool, arguments in (
                ("emo_detect", {"image_url": value}),
                ("emo_generate", {"image_url": PORTRAIT, "audio_url": value, "dry_run": True, **boxes}),
            ):
                try:
                    h.run(tool, arguments)
                except AssertionError as exc:
                    failed[value] = str(exc).splitlines()[0]
        counts = dict(h.counts)
    record_property("fuzz_examples", counts)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        with capsys.disabled():
            reporter.write_line(f"fuzz corpus of {len(CORPUS)} odd media: {counts}")
    assert failed == {}


def _boxes(detection: dict[str, Any]) -> dict[str, Any]:
    return {"face_bbox": detection["face_bbox"], "ext_bbox": detection["ext_bbox"]}
