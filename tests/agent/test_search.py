"""Search through the gRPC API with each engine, and the two engines against each other on one tree:
same files, lines, submatch offsets and order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.fs.paths import WorkspaceRoot
from agent.fs.search import Searcher, SearchQuery, Summary
from tests.agent.helpers import collect, status_of_stream
from tests.conftest import AgentTarget, start_inprocess_agent
from workspace.agent.v1 import agent_pb2 as pb

ENGINES = ["ripgrep", "python"]


def build_tree(root: Path, outside: Path) -> None:
    """A workspace with every case the filters and the matcher distinguish."""
    files: dict[str, bytes] = {
        ".gitignore": b"ignored.txt\nbuild/\n*.log\n!keep.log\n",
        ".hidden_file": b"needle hidden\n",
        ".config/settings.txt": b"needle in a hidden directory\n",
        ".git/HEAD": b"needle in git\n",
        "node_modules/lib/index.js": b"needle in node_modules\n",
        "ignored.txt": b"needle ignored\n",
        "build/out.txt": b"needle in build\n",
        "debug.log": b"needle log\n",
        "keep.log": b"needle kept log\n",
        "binary.bin": b"needle\0binary\n",
        "late_binary.bin": b"needle\n" + b"x" * 70_000 + b"\0\n",  # NUL past rg's first buffer
        "a/x.txt": b"needle in a directory named a\n",
        "a-b.txt": b"needle a-b\n",
        "a.txt": b"needle a\n",
        "src/.ignore": b"generated.ts\n",
        "src/generated.ts": b"needle generated\n",
        "src/main.ts": b"const a = 1;\n// needle one\nconst b = 2;\nconst c = 3;\nconst d = 4;\nneedle two needle\nend\n",
        "src/unicode.txt": "héllo needle wörld\n日本語 NEEDLE Ñandú\n".encode(),
        "src/crlf.txt": b"needle crlf\r\nother\r\n",
        "src/long.txt": b"x" * 5000 + b"needle\n" + b"y" * 4093 + b"needle\n",
        "src/invalid.txt": b"caf\xe9 needle\n",
        "src/sub/deep.py": b"# needle deep\nDEF = 'Needle'\n",
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (outside / "secret.txt").write_bytes(b"needle outside the root\n")
    (root / "link_in.txt").symlink_to("src/main.ts")
    (root / "link_out").symlink_to(outside)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "app"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    build_tree(root, outside)
    return root


@pytest.fixture(params=ENGINES)
async def searching_agent(request: pytest.FixtureRequest, tree: Path) -> AsyncIterator[AgentTarget]:
    server, target = await start_inprocess_agent(tree, search_engine=request.param)
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


async def search(agent: AgentTarget, **fields) -> tuple[list[pb.SearchHit], pb.SearchSummary]:
    """The hits of a search in the order received, and its summary."""
    responses = await collect(agent.stub.Search(pb.SearchRequest(**fields), metadata=agent.metadata))
    assert [r.HasField("summary") for r in responses] == [False] * (len(responses) - 1) + [True]
    return [hit for r in responses for hit in r.hits], responses[-1].summary


def matches(hits: list[pb.SearchHit]) -> list[tuple[str, int, str, list[tuple[int, int]]]]:
    return [
        (h.match.path, h.match.line_number, h.match.line, [(s.start, s.end) for s in h.match.submatches])
        for h in hits
        if h.WhichOneof("hit") == "match"
    ]


async def test_default_search_skips_ignored_hidden_dependency_binary_and_linked_files(
    searching_agent: AgentTarget, request: pytest.FixtureRequest
) -> None:
    hits, summary = await search(searching_agent, pattern="needle")
    assert [path for path, *_ in matches(hits)] == [
        "a/x.txt",  # entries sorted by name in each directory: "a" before "a-b.txt"
        "a-b.txt",
        "a.txt",
        "keep.log",  # whitelisted by `!keep.log`
        "src/crlf.txt",
        "src/invalid.txt",
        "src/long.txt",
        "src/long.txt",
        "src/main.ts",
        "src/main.ts",
        "src/sub/deep.py",
        "src/unicode.txt",
    ]
    assert (summary.results, summary.files_matched, summary.truncated) == (12, 10, False)
    assert summary.engine == request.node.callspec.params["searching_agent"]


async def test_match_lines_and_byte_offsets(searching_agent: AgentTarget) -> None:
    hits, _ = await search(searching_agent, pattern="needle", path="src")
    found = {(path, line): (text, spans) for path, line, text, spans in matches(hits)}
    assert found[("src/unicode.txt", 1)] == ("héllo needle wörld", [(7, 13)])  # é is two bytes
    assert found[("src/crlf.txt", 1)] == ("needle crlf", [(0, 6)])  # without its \r\n
    assert found[("src/invalid.txt", 1)] == ("caf\ufffd needle", [(7, 13)])  # U+FFFD is three bytes
    assert found[("src/main.ts", 6)] == ("needle two needle", [(0, 6), (11, 17)])
    # Lines are cut at 4 KiB; so are the matches in them.
    assert found[("src/long.txt", 1)] == ("x" * 4096, [])
    assert found[("src/long.txt", 2)] == ("y" * 4093 + "nee", [(4093, 4096)])
    cut = [h.match.line_truncated for h in hits if h.match.path == "src/long.txt"]
    assert cut == [True, True]


async def test_context_lines_come_in_file_order(searching_agent: AgentTarget) -> None:
    hits, summary = await search(searching_agent, pattern="needle", path="src", include_globs=["main.ts"],
                                   context_before=1, context_after=2)  # fmt: skip
    lines = [(h.WhichOneof("hit"), getattr(h, h.WhichOneof("hit")).line_number) for h in hits]
    assert lines == [("context", 1), ("match", 2), ("context", 3), ("context", 4), ("context", 5),
                     ("match", 6), ("context", 7)]  # fmt: skip
    assert summary.results == 2


async def test_options_widen_or_narrow_the_search(searching_agent: AgentTarget) -> None:
    async def paths(**fields) -> set[str]:
        hits, _ = await search(searching_agent, pattern="needle", **fields)
        return {path for path, *_ in matches(hits)}

    default = await paths()
    assert await paths(hidden=True) - default == {".hidden_file", ".config/settings.txt"}
    assert await paths(no_ignore=True) - default == {"ignored.txt", "build/out.txt", "debug.log", "src/generated.ts"}
    assert await paths(include_default_excludes=True, hidden=True) - await paths(hidden=True) == {
        "node_modules/lib/index.js",
        ".git/HEAD",
    }
    # As with rg, an include glob overrides ignore files: debug.log is searched.
    assert await paths(include_globs=["src/**/*.py", "*.log"]) == {"src/sub/deep.py", "keep.log", "debug.log"}
    assert await paths(exclude_globs=["src", "a*"]) == {"keep.log"}
    assert await paths(path="src/sub") == {"src/sub/deep.py"}


async def test_regex_and_ignore_case(searching_agent: AgentTarget) -> None:
    hits, _ = await search(searching_agent, pattern=r"ne+dle\s+(one|two)", regex=True)
    assert [(p, n) for p, n, *_ in matches(hits)] == [("src/main.ts", 2), ("src/main.ts", 6)]
    hits, _ = await search(searching_agent, pattern="ne+dle", path="src/sub")  # literal: no match
    assert matches(hits) == []
    hits, _ = await search(searching_agent, pattern="needle", ignore_case=True, path="src/sub")
    assert [(n, spans) for _, n, _, spans in matches(hits)] == [(1, [(2, 8)]), (2, [(7, 13)])]
    hits, _ = await search(searching_agent, pattern="ñandú", ignore_case=True, path="src")
    assert matches(hits) == [("src/unicode.txt", 2, "日本語 NEEDLE Ñandú", [(17, 24)])]


async def test_result_cap_sets_truncated(searching_agent: AgentTarget) -> None:
    hits, summary = await search(searching_agent, pattern="needle", max_results=3, context_after=1)
    assert [p for p, *_ in matches(hits)] == ["a/x.txt", "a-b.txt", "a.txt"]
    assert (summary.results, summary.files_matched, summary.truncated) == (3, 3, True)
    _, exact = await search(searching_agent, pattern="needle", max_results=12)
    assert (exact.results, exact.truncated) == (12, False)


async def test_file_discovery(searching_agent: AgentTarget) -> None:
    hits, summary = await search(searching_agent, path="src")
    files = [(h.file.path, h.file.size) for h in hits]
    assert [path for path, _ in files] == [
        "src/crlf.txt", "src/invalid.txt", "src/long.txt", "src/main.ts", "src/sub/deep.py", "src/unicode.txt",
    ]  # fmt: skip
    assert dict(files)["src/crlf.txt"] == len(b"needle crlf\r\nother\r\n")
    hits, summary = await search(searching_agent, include_globs=["*.bin"])
    assert [h.file.path for h in hits] == ["binary.bin", "late_binary.bin"]  # listed, binary or not
    hits, summary = await search(searching_agent, max_results=2)
    assert [h.file.path for h in hits] == ["a/x.txt", "a-b.txt"] and summary.truncated


async def test_bad_requests(searching_agent: AgentTarget) -> None:
    cases = [
        (pb.SearchRequest(pattern="x", path="missing"), grpc.StatusCode.NOT_FOUND),
        (pb.SearchRequest(pattern="x", path="a.txt"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", path="/etc"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", path="../outside"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", path="src\x00"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", path="link_out"), grpc.StatusCode.PERMISSION_DENIED),
        (pb.SearchRequest(pattern="(unclosed", regex=True), grpc.StatusCode.INVALID_ARGUMENT),
        # Neither engine backtracks, so neither has backreferences or look-around.
        (pb.SearchRequest(pattern=r"(a)\1", regex=True), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern=r"a(?=b)", regex=True), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="two\nlines"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="nul\x00byte"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(include_globs=["*.txt\x00"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", exclude_globs=["\x00"]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", context_before=21), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SearchRequest(pattern="x", max_results=100_001), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        got, details = await status_of_stream(searching_agent.stub.Search(request, metadata=searching_agent.metadata))
        assert got == code, (request, details)


@pytest.mark.parametrize("engine", ENGINES)
async def test_cancelling_stops_the_search(engine: str, tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    (root / "many.txt").write_bytes(b"needle\n" * 400_000)  # far more rg output than the agent reads ahead
    server, agent = await start_inprocess_agent(root, search_engine=engine)
    try:
        call = agent.stub.Search(pb.SearchRequest(pattern="needle", max_results=20_000), metadata=agent.metadata)
        first = await call.read()
        assert (first.hits[0].match.path, first.hits[0].match.line_number) == ("many.txt", 1)
        assert len(rg_children()) == (1 if engine == "ripgrep" else 0)
        call.cancel()
        for _ in range(100):
            if not rg_children():
                break
            await asyncio.sleep(0.01)
        assert rg_children() == []
    finally:
        await agent.channel.close()
        await server.stop(None)


@pytest.mark.parametrize("engine", ENGINES)
async def test_reaching_the_cap_stops_rg(engine: str, tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    (root / "many.txt").write_bytes(b"needle\n" * 400_000)
    server, agent = await start_inprocess_agent(root, search_engine=engine)
    try:
        hits, summary = await search(agent, pattern="needle", max_results=5)
        assert [h.match.line_number for h in hits] == [1, 2, 3, 4, 5] and summary.truncated
        assert rg_children() == []
    finally:
        await agent.channel.close()
        await server.stop(None)


@pytest.mark.parametrize("engine", ENGINES)
async def test_hits_come_in_batches_in_order(engine: str, tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    (root / "many.txt").write_bytes(b"needle\n" * 2500)
    (root / "wide.txt").write_bytes((b"needle " + b"w" * 4000 + b"\n") * 40)
    server, agent = await start_inprocess_agent(root, search_engine=engine)
    try:
        request = pb.SearchRequest(pattern="needle", max_results=10_000)
        responses = await collect(agent.stub.Search(request, metadata=agent.metadata))
        # A file's hits are found together: 2,500 short lines fill two responses of 1,000 hits, 40 lines of 4 KiB
        # take three or so of about 64 KiB; the rest may be split between the files, and the summary comes last.
        assert [len(r.hits) for r in responses[:2]] == [1000, 1000]
        assert all(len(r.hits) <= 1000 and r.ByteSize() < 70 * 1024 for r in responses)
        assert len(responses) <= 7
        hits = [(h.match.path, h.match.line_number) for r in responses for h in r.hits]
        assert hits == [("many.txt", n) for n in range(1, 2501)] + [("wide.txt", n) for n in range(1, 41)]
        assert responses[-1].summary.results == 2540
    finally:
        await agent.channel.close()
        await server.stop(None)


async def test_a_slow_search_streams_what_it_has_found(tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    (root / "a.txt").write_bytes(b"needle\n")
    for i in range(20):  # a match across lines makes the engine try each line of them, finding none
        (root / f"slow{i:02}.txt").write_bytes(b"x\ny\n" * 10_000)
    server, agent = await start_inprocess_agent(root, search_engine="python")
    try:
        call = agent.stub.Search(pb.SearchRequest(pattern=r"needle|x\sy", regex=True), metadata=agent.metadata)
        started = time.monotonic()
        first = await call.read()
        waited = time.monotonic() - started
        assert [h.match.path for h in first.hits] == ["a.txt"]
        while (last := await call.read()) is not aio.EOF:
            summary = last.summary
        assert waited < summary.elapsed.ToTimedelta().total_seconds() / 2
    finally:
        await agent.channel.close()
        await server.stop(None)


CATASTROPHIC = [r"(a+)+$", r"(a|a)*$", r"(a|aa)+$", r"(.*a){20}$", r"^(\w+\s?)*$"]


@pytest.mark.parametrize("engine", ENGINES)
async def test_no_pattern_stalls_the_agent(engine: str, tmp_path: Path) -> None:
    # Patterns that take a backtracking engine exponential time on these lines: the search ends, and a
    # Read sent while it runs is answered (the event loop stays free whatever the matcher does).
    root = tmp_path / "app"
    root.mkdir()
    for i in range(20):
        (root / f"a{i:02}.txt").write_bytes(b"a" * 5000 + b"b\n" + (b"word " * 2000).strip() + b"!\n")
    (root / "small.txt").write_bytes(b"hello\n")
    server, agent = await start_inprocess_agent(root, search_engine=engine)
    try:
        for pattern in CATASTROPHIC:
            request = pb.SearchRequest(pattern=pattern, regex=True)
            search = asyncio.ensure_future(collect(agent.stub.Search(request, metadata=agent.metadata, timeout=60)))
            read = await collect(agent.stub.Read(pb.ReadRequest(path="small.txt"), metadata=agent.metadata))
            assert b"".join(r.chunk.data for r in read if r.HasField("chunk")) == b"hello\n"
            responses = await search
            assert responses[-1].HasField("summary"), pattern
    finally:
        await agent.channel.close()
        await server.stop(None)


async def test_searches_and_reads_cut_short_by_any_deadline_leave_no_open_stream(agent: AgentTarget) -> None:
    # Deadlines of 1 to 5 ms end streams before, between and after their messages: every one of them must
    # stop counting as open (the idle reaper would take the workspace for busy forever).
    (agent.root / "many.txt").write_bytes(b"needle\n" * 50_000)
    for attempt in range(40):
        timeout = 0.001 * (1 + attempt % 5)
        search = agent.stub.Search(pb.SearchRequest(pattern="needle"), metadata=agent.metadata, timeout=timeout)
        read_request = pb.ReadRequest(path="many.txt", chunk_size=1024)
        read = agent.stub.Read(read_request, metadata=agent.metadata, timeout=timeout)
        for call in (search, read):
            with contextlib.suppress(aio.AioRpcError):
                await collect(call)
    for _ in range(100):
        activity = await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
        if activity.open_streams == 0:
            break
        await asyncio.sleep(0.05)
    assert activity.open_streams == 0


def rg_children() -> list[int]:
    """Pids of this process's child processes running rg."""
    children = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if name == "rg" and int(rest[1]) == os.getpid():
            children.append(int(pid))
    return children


# ------------------------------------------------------------------ both engines, same results


def run_both(root: Path, query: SearchQuery) -> tuple[list, list]:
    async def run(engine: str) -> list:
        searcher = Searcher(WorkspaceRoot(root), default_max_results=1000, max_results_limit=100_000, engine=engine)
        *batches, summary = [event async for event in searcher.search(query)]
        assert isinstance(summary, Summary) and summary.engine == engine
        hits = [hit for batch in batches for hit in batch]
        return [*hits, (summary.results, summary.files_matched, summary.truncated)]

    async def both() -> tuple[list, list]:
        return await run("ripgrep"), await run("python")

    return asyncio.run(both())


WORDS = ["needle", "NEEDLE", "ne+dle", "const", "a", "ö", "日本", "x{3}", r"\bneedle\b", "needle$", "^const", "e.d"]
GLOBS = ["*.ts", "src/**", "*.log", "a*", "sub", "src", "*.txt", "lib/", "[ab]*.txt", "**/deep.*"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pattern=st.sampled_from(["", *WORDS]),
    regex=st.booleans(),
    ignore_case=st.booleans(),
    include=st.lists(st.sampled_from(GLOBS), max_size=2),
    exclude=st.lists(st.sampled_from(GLOBS), max_size=2),
    no_ignore=st.booleans(),
    hidden=st.booleans(),
    defaults=st.booleans(),
    before=st.integers(0, 3),
    after=st.integers(0, 3),
    cap=st.sampled_from([0, 1, 2, 5]),
    path=st.sampled_from(["", "src", "a", "build", "node_modules"]),
)
def test_engines_agree(tree: Path, pattern, regex, ignore_case, include, exclude, no_ignore, hidden, defaults,
                       before, after, cap, path) -> None:  # fmt: skip
    query = SearchQuery(
        path=path, pattern=pattern, regex=regex, ignore_case=ignore_case, include_globs=include,
        exclude_globs=exclude, no_ignore=no_ignore, hidden=hidden, include_default_excludes=defaults,
        context_before=before, context_after=after, max_results=cap,
    )  # fmt: skip
    ripgrep, python = run_both(tree, query)
    assert ripgrep == python


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(st.text(alphabet="aAbéÉß日 .\r\t\x00\x85", max_size=12), max_size=12),
    pattern=st.sampled_from(["a", "é", "ab", "日", "ss", r"a\b", "^a", "a$", "[ab]+", r"\s"]),
    regex=st.booleans(),
    ignore_case=st.booleans(),
    before=st.integers(0, 2),
    after=st.integers(0, 2),
    cap=st.sampled_from([0, 1, 3]),
)
def test_engines_agree_on_generated_content(lines, pattern, regex, ignore_case, before, after, cap) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        content = "\n".join(lines).encode()
        (root / "one.txt").write_bytes(content)
        (root / "two.txt").write_bytes(content[::-1] + b"\xff a\n")  # invalid UTF-8 too
        query = SearchQuery(pattern=pattern, regex=regex, ignore_case=ignore_case, context_before=before,
                            context_after=after, max_results=cap)  # fmt: skip
        ripgrep, python = run_both(root, query)
        assert ripgrep == python
