"""50 concurrent mixed calls (Read, Search, Exec, Edit) against one agent, all correct."""

from __future__ import annotations

import asyncio
import hashlib

from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb


async def test_fifty_concurrent_mixed_calls(agent: AgentTarget) -> None:
    for i in range(10):
        (agent.root / f"doc{i}.txt").write_text(f"document {i}\nneedle-{i}\n" * 50)

    async def read(i: int) -> None:
        data = b""
        async for event in agent.stub.Read(pb.ReadRequest(path=f"doc{i % 10}.txt"), metadata=agent.metadata):
            data += event.chunk.data
        assert data == (agent.root / f"doc{i % 10}.txt").read_bytes()

    async def search(i: int) -> None:
        lines = []
        request = pb.SearchRequest(pattern=f"needle-{i % 10}", include_globs=["doc*.txt"])
        async for response in agent.stub.Search(request, metadata=agent.metadata):
            lines += [(hit.match.path, hit.match.line) for hit in response.hits]
            if response.HasField("summary"):
                assert response.summary.results == 50
        assert lines == [(f"doc{i % 10}.txt", f"needle-{i % 10}")] * 50

    async def run(i: int) -> None:
        async def requests():
            yield pb.ExecRequest(start=pb.ExecStart(argv=["sh", "-c", f"echo out-{i}; exit {i % 3}"]))

        out, code = b"", None
        async for event in agent.stub.Exec(requests(), metadata=agent.metadata):
            kind = event.WhichOneof("event")
            if kind == "output":
                out += event.output.data
            elif kind == "exited":
                code = event.exited.exit_code
        assert (out, code) == (f"out-{i}\n".encode(), i % 3)

    async def edit(i: int) -> None:
        content = f"edited by call {i}\n".encode()
        reply = await agent.stub.Edit(
            pb.EditRequest(operations=[pb.EditOperation(write=pb.WriteFile(path=f"out/{i}.txt", content=content))]),
            metadata=agent.metadata,
        )
        assert [f.sha256 for f in reply.files] == [hashlib.sha256(content).hexdigest()]
        assert (agent.root / "out" / f"{i}.txt").read_bytes() == content

    kinds = (read, search, run, edit)
    await asyncio.wait_for(asyncio.gather(*(kinds[i % 4](i) for i in range(50))), timeout=60)
