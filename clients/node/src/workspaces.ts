// Sessions through the orchestrator: create one and follow it until READY, save and restore it, fork, pause and
// resume it, mint preview tokens, upload archives, list and delete; `agent(session)` opens the session's agent.

import { create, type MessageInitShape } from '@bufbuild/protobuf';
import { durationFromMs, timestampDate } from '@bufbuild/protobuf/wkt';
import { createClient, type Client } from '@connectrpc/connect';
import { Agent } from './agent.js';
import { SessionFailedError, streamed, unary } from './errors.js';
import {
  type Archive,
  type GetPoolsResponse,
  type GetTemplateArchiveResponse,
  type ListSessionsRequestSchema,
  OrchestratorService,
  type Session,
  SessionState,
  type Template,
  type TemplateArchiveInfo,
  UploadArchiveRequestSchema,
  type WatchSessionResponse,
} from './gen/workspace/orchestrator/v1/orchestrator_pb.js';
import { type ByteSource, chunks, type Download, download } from './streams.js';
import { type CallOptions, type Connection, connect } from './transport.js';

/** Where a session's files come from: a template by name, or a saved or uploaded archive by id. */
export type SessionSource = { template: string; archiveId?: never } | { archiveId: string; template?: never };

/** One progress event of a session: its new state, a phase's outcome, or a line of install/dev output. */
export type SessionEvent = WatchSessionResponse['event'];

export interface WaitOptions extends CallOptions {
  /** Sees every progress event on the way, READY (or FAILED) included. */
  onEvent?: (event: SessionEvent) => void;
}

export interface SessionFilter {
  states?: SessionState[];
  template?: string;
  labels?: Record<string, string>;
}

/** The orchestrator at one address: one HTTP/2 connection, shared by every call; `close()` ends it. */
export class Workspaces {
  private readonly connection: Connection;
  private readonly client: Client<typeof OrchestratorService>;

  constructor(address: string) {
    this.connection = connect(address);
    this.client = createClient(OrchestratorService, this.connection.transport);
  }

  /** Starts a session; resolves at once with it (PENDING): follow it with `waitReady`. */
  async createSession(source: SessionSource, options: CallOptions & { labels?: Record<string, string> } = {}): Promise<Session> {
    const { labels = {}, ...call } = options;
    const request = source.template !== undefined
      ? { source: { case: 'template' as const, value: source.template }, labels }
      : { source: { case: 'archiveId' as const, value: source.archiveId }, labels };
    const { session } = await unary(() => this.client.createSession(request, call));
    return required(session, 'CreateSession');
  }

  async getSession(id: string, options: CallOptions = {}): Promise<Session> {
    const { session } = await unary(() => this.client.getSession({ id }, options));
    return required(session, 'GetSession');
  }

  /** Every session matching the filter (all pages). */
  async listSessions(filter: SessionFilter = {}, options: CallOptions = {}): Promise<Session[]> {
    const sessions: Session[] = [];
    let pageToken = '';
    do {
      const request: MessageInitShape<typeof ListSessionsRequestSchema> = { ...filter, pageToken };
      const page = await unary(() => this.client.listSessions(request, options));
      sessions.push(...page.sessions);
      pageToken = page.nextPageToken;
    } while (pageToken !== '');
    return sessions;
  }

  /** The session's progress events: its current state first, then phases, output lines and state changes. */
  watchSession(id: string, options: CallOptions = {}): AsyncIterable<SessionEvent> {
    const responses = streamed(this.client.watchSession({ id }, options));
    return (async function* events() {
      for await (const response of responses) yield response.event;
    })();
  }

  /**
   * Follows the session until it is READY (resolves with it, its agent endpoint and token set) or FAILED
   * (rejects with SessionFailedError: the failed phase, the reason and the last output lines).
   */
  async waitReady(id: string, options: WaitOptions = {}): Promise<Session> {
    const { onEvent, ...call } = options;
    for await (const event of this.watchSession(id, call)) {
      onEvent?.(event);
      if (event.case !== 'session') continue;
      if (event.value.state === SessionState.READY) return event.value; // leaving the loop ends the watch
      if (event.value.state === SessionState.FAILED) throw new SessionFailedError(event.value);
      if (event.value.state === SessionState.STOPPED) throw new Error(`session ${id} stopped before it was ready`);
    }
    throw new Error(`the watch of session ${id} ended before it was ready`);
  }

  /** Stops and removes the session's workspace; with `save`, saves it first and resolves with the archive. */
  async deleteSession(id: string, options: CallOptions & { save?: boolean } = {}): Promise<Archive | undefined> {
    const { save = false, ...call } = options;
    const { archive } = await unary(() => this.client.deleteSession({ id, save }, call));
    return archive;
  }

  /**
   * A new session from the READY session's current files (its install and dev steps run anew); resolves at
   * once with the fork (PENDING): follow it with `waitReady`. With `save`, the source is saved first and the
   * fork restored from that archive, returned beside it. The source keeps running.
   */
  async forkSession(
    id: string,
    options: CallOptions & { labels?: Record<string, string>; save?: boolean } = {},
  ): Promise<{ session: Session; archive?: Archive }> {
    const { labels = {}, save = false, ...call } = options;
    const { session, archive } = await unary(() => this.client.forkSession({ id, labels, save }, call));
    return { session: required(session, 'ForkSession'), archive };
  }

  /** Stops the READY session's processes and releases its CPU and memory, keeping its files: PAUSED. */
  async pauseSession(id: string, options: CallOptions = {}): Promise<Session> {
    const { session } = await unary(() => this.client.pauseSession({ id }, options));
    return required(session, 'PauseSession');
  }

  /** Starts a PAUSED session again; resolves at once (STARTING): follow it with `waitReady`. */
  async resumeSession(id: string, options: CallOptions = {}): Promise<Session> {
    const { session } = await unary(() => this.client.resumeSession({ id }, options));
    return required(session, 'ResumeSession');
  }

  /**
   * A signed, expiring token that opens the session's preview through the orchestrator's preview gateway, and
   * the gateway URLs carrying it (empty when the orchestrator runs no gateway). `ttlMs`: 1 s to 7 days
   * (default 1 hour).
   */
  async createPreviewToken(
    id: string,
    options: CallOptions & { ttlMs?: number } = {},
  ): Promise<{ token: string; expiresAt?: Date; url: string; pathUrl: string }> {
    const { ttlMs, ...call } = options;
    const ttl = ttlMs === undefined ? undefined : durationFromMs(ttlMs);
    const answer = await unary(() => this.client.createPreviewToken({ id, ttl }, call));
    const expiresAt = answer.expiresAt === undefined ? undefined : timestampDate(answer.expiresAt);
    return { token: answer.token, expiresAt, url: answer.url, pathUrl: answer.pathUrl };
  }

  /** Saves the session's workspace as an archive; `createSession({ archiveId })` restores it. */
  async saveSession(id: string, options: CallOptions & { name?: string } = {}): Promise<Archive> {
    const { name = '', ...call } = options;
    const { archive } = await unary(() => this.client.saveSession({ id, name }, call));
    return required(archive, 'SaveSession');
  }

  async listArchives(options: CallOptions & { sessionId?: string } = {}): Promise<Archive[]> {
    const { sessionId = '', ...call } = options;
    return (await unary(() => this.client.listArchives({ sessionId }, call))).archives;
  }

  async deleteArchive(id: string, options: CallOptions = {}): Promise<void> {
    await unary(() => this.client.deleteArchive({ id }, options));
  }

  /** Uploads a tar.gz (a Readable, or any async iterable of bytes) as an archive sessions can start from. */
  async uploadArchive(
    source: ByteSource,
    spec: { template: string; name?: string; expectedSha256?: string },
    options: CallOptions = {},
  ): Promise<Archive> {
    async function* requests() {
      yield create(UploadArchiveRequestSchema, { request: { case: 'spec', value: spec } });
      for await (const chunk of chunks(source)) {
        yield create(UploadArchiveRequestSchema, { request: { case: 'chunk', value: chunk } });
      }
    }
    const { archive } = await unary(() => this.client.uploadArchive(requests(), options));
    return required(archive, 'UploadArchive');
  }

  /** The orchestrator's running pools: the warm pool (unset when off) and the hot pools, each with how many
   *  workspaces are ready to hand out, being prepared, and kept (`target`, within --max-sessions). */
  async getPools(options: CallOptions = {}): Promise<Pick<GetPoolsResponse, 'warm' | 'hot'>> {
    const { warm, hot } = await unary(() => this.client.getPools({}, options));
    return { warm, hot };
  }

  async listTemplates(options: CallOptions = {}): Promise<Template[]> {
    return (await unary(() => this.client.listTemplates({}, options))).templates;
  }

  /** A template's files as a tar.gz Readable; `meta` is its info (sha256, size, files), sent first. */
  downloadTemplate(name: string, options: CallOptions = {}): Download<TemplateArchiveInfo> {
    return download<GetTemplateArchiveResponse, TemplateArchiveInfo>(
      () => streamed(this.client.getTemplateArchive({ name }, options)),
      ({ event }) => (event.case === 'chunk' ? { chunk: event.value } : event.case === 'info' ? { meta: event.value } : undefined),
    );
  }

  /** The agent of a READY session. `endpoint` overrides the session's `agentEndpoint` (e.g. through a proxy). */
  agent(session: Session, options: { endpoint?: string } = {}): Agent {
    const endpoint = options.endpoint ?? session.agentEndpoint;
    if (endpoint === '') throw new Error(`session ${session.id} has no agent endpoint yet: wait until it is READY`);
    return new Agent(endpoint, session.agentToken);
  }

  close(): void {
    this.connection.close();
  }
}

function required<T>(value: T | undefined, rpc: string): T {
  if (value === undefined) throw new Error(`${rpc} answered without its result`);
  return value;
}
