"""The OrchestratorService servicer: thin methods that unpack the request, call the SessionManager or the
ArchiveStore once, and wrap the result. Domain errors are mapped to status codes by the interceptor.
The records below are the contract's messages (pb.Session, pb.Archive): passed through, never converted."""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from orchestrator.archives import ArchiveOrigin, ArchiveStore, Expected
from orchestrator.errors import InvalidArgument
from orchestrator.gateway import PreviewAccess
from orchestrator.sessions import SessionManager
from orchestrator.templates import TemplateArchive, TemplateCatalog, TemplateSpec
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(
        self, sessions: SessionManager, archives: ArchiveStore, catalog: TemplateCatalog, previews: PreviewAccess
    ) -> None:
        self._sessions = sessions
        self._archives = archives
        self._catalog = catalog
        self._previews = previews

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        session = await self._sessions.create(
            template=request.template, archive_id=request.archive_id, labels=request.labels,
            public_preview=request.public_preview,
        )  # fmt: skip
        return pb.CreateSessionResponse(session=session)

    async def GetSession(self, request: pb.GetSessionRequest, context: aio.ServicerContext) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(session=await self._sessions.get(request.id))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        sessions, next_page_token = await self._sessions.list(
            states=request.states,
            template=request.template,
            labels=request.labels,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=next_page_token)

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        async for event in self._sessions.watch(request.id):
            yield event

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        archive = await self._sessions.delete(request.id, save=request.save)
        return pb.DeleteSessionResponse(archive=archive)

    async def SaveSession(self, request: pb.SaveSessionRequest, context: aio.ServicerContext) -> pb.SaveSessionResponse:
        return pb.SaveSessionResponse(archive=await self._sessions.save(request.id, request.name))

    async def ForkSession(self, request: pb.ForkSessionRequest, context: aio.ServicerContext) -> pb.ForkSessionResponse:
        session, archive = await self._sessions.fork(request.id, labels=request.labels, save=request.save)
        return pb.ForkSessionResponse(session=session, archive=archive)

    async def PauseSession(
        self, request: pb.PauseSessionRequest, context: aio.ServicerContext
    ) -> pb.PauseSessionResponse:
        return pb.PauseSessionResponse(session=await self._sessions.pause(request.id))

    async def ResumeSession(
        self, request: pb.ResumeSessionRequest, context: aio.ServicerContext
    ) -> pb.ResumeSessionResponse:
        return pb.ResumeSessionResponse(session=await self._sessions.resume(request.id))

    async def ListArchives(
        self, request: pb.ListArchivesRequest, context: aio.ServicerContext
    ) -> pb.ListArchivesResponse:
        return pb.ListArchivesResponse(archives=await self._archives.list(request.session_id))

    async def DeleteArchive(
        self, request: pb.DeleteArchiveRequest, context: aio.ServicerContext
    ) -> pb.DeleteArchiveResponse:
        await self._archives.delete(request.id)
        return pb.DeleteArchiveResponse()

    async def UploadArchive(
        self, requests: AsyncIterator[pb.UploadArchiveRequest], context: aio.ServicerContext
    ) -> pb.UploadArchiveResponse:
        requests = aiter(requests)
        first = await anext(requests, None)
        if first is None or not first.HasField("spec"):
            raise InvalidArgument("the first UploadArchive message must carry the spec, then chunks follow")
        spec = first.spec
        self._catalog.get(spec.template)  # a restore needs the template's commands: refuse unknown ones now
        origin = ArchiveOrigin(name=spec.name, source=pb.ARCHIVE_SOURCE_UPLOADED, template=spec.template)
        archive = await self._archives.write(origin, _chunks(requests), expected=Expected(spec.expected_sha256))
        return pb.UploadArchiveResponse(archive=archive)

    async def ListTemplates(
        self, request: pb.ListTemplatesRequest, context: aio.ServicerContext
    ) -> pb.ListTemplatesResponse:
        return pb.ListTemplatesResponse(
            templates=[_template_message(spec, archive) for spec, archive in await self._catalog.listing()]
        )

    async def GetTemplateArchive(
        self, request: pb.GetTemplateArchiveRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GetTemplateArchiveResponse]:
        archive = await self._catalog.archive(request.name)
        yield pb.GetTemplateArchiveResponse(
            info=pb.TemplateArchiveInfo(
                name=archive.name, sha256=archive.sha256, size=archive.size, files=archive.files
            )
        )
        async for chunk in archive.chunks():
            yield pb.GetTemplateArchiveResponse(chunk=chunk)

    async def CreatePreviewToken(
        self, request: pb.CreatePreviewTokenRequest, context: aio.ServicerContext
    ) -> pb.CreatePreviewTokenResponse:
        ttl_s = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 0.0
        return await self._previews.create_token(request.id, ttl_s)

    async def GetPools(self, request: pb.GetPoolsRequest, context: aio.ServicerContext) -> pb.GetPoolsResponse:
        return self._sessions.pools_status()


async def _chunks(requests: AsyncIterator[pb.UploadArchiveRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if not request.HasField("chunk"):
            raise InvalidArgument("only chunks may follow the spec in UploadArchive")
        yield request.chunk


def _template_message(spec: TemplateSpec, archive: TemplateArchive | None) -> pb.Template:
    return pb.Template(
        name=spec.name,
        valid=spec.valid,
        invalid_reason=spec.invalid_reason,
        title=spec.title,
        description=spec.description,
        install_command=spec.install_command,
        dev_command=spec.dev_command,
        dev_port=spec.dev_port if spec.valid else 0,
        archive_sha256=archive.sha256 if archive else "",
        files=archive.files if archive else 0,
    )
