// One workspace's agent: read, search and edit files, run commands (streamed output, stdin, signals), named
// processes that survive a dropped connection, and archives in and out as Node streams.

import { create, type MessageInitShape } from '@bufbuild/protobuf';
import { durationFromMs } from '@bufbuild/protobuf/wkt';
import { createClient, type Client } from '@connectrpc/connect';
import { Code, WorkspaceError, streamed, unary, workspaceError } from './errors.js';
import {
  AgentService,
  type ArchiveSummary,
  type AttachProcessResponse,
  type CreateArchiveResponse,
  type DeletePath,
  type EditOperationSchema,
  type EditResponse,
  ExecRequestSchema,
  type ExecStartSchema,
  ExtractArchiveRequestSchema,
  type ExtractArchiveResponse,
  type ExtractMode,
  type FileInfo,
  type GetActivityResponse,
  type InsertText,
  type MakeDirectory,
  type MovePath,
  type ProcessExited,
  type ProcessInfo,
  type ProcessOutput,
  type ProcessStarted,
  type ReplaceText,
  type SearchHit,
  type SearchRequestSchema,
  type SearchSummary,
  Signal,
  type WriteFile,
} from './gen/workspace/agent/v1/agent_pb.js';
import { type ByteSource, RequestQueue, chunks, type Download, download } from './streams.js';
import { bearer, type CallOptions, type Connection, connect } from './transport.js';

type Init<Schema extends Parameters<typeof create>[0]> = MessageInitShape<Schema>;

/** What to run: a program and its arguments (looked up on PATH), or a command line for `/bin/sh -c`. */
export type Command = { argv: string[]; shell?: never } | { shell: string; argv?: never };

export interface StartOptions extends CallOptions {
  /** Working directory relative to the workspace root. */
  cwd?: string;
  env?: Record<string, string>;
  /** The agent kills the command after this long (the exit says `timedOut`). */
  killAfterMs?: number;
  /** Run under a pseudo-terminal; output is then one stream (OUTPUT_STREAM_PTY). */
  pty?: { rows: number; cols: number };
  /** Keep stdin open for `write()`; otherwise stdin is /dev/null. */
  openStdin?: boolean;
  /** Each output chunk, in order, as it arrives. */
  onOutput?: (output: ProcessOutput) => void;
}

export interface ExecOptions extends StartOptions {
  /** Written to the command's stdin, which is then closed. */
  stdin?: string | Uint8Array | ByteSource;
}

/** A file's metadata and its content (or the range asked for). */
export interface FileContent {
  info: FileInfo;
  data: Buffer;
}

export interface ReadOptions extends CallOptions {
  /** Bytes from `offset` (`length` 0: to the end), or lines `start` to `end` (1-based, inclusive; `end` 0: to
   * the end). Unset: the whole file. */
  range?: OneOf<{ bytes: { offset?: bigint; length?: bigint }; lines: { start?: bigint; end?: bigint } }>;
}

/** One search: `pattern` set searches contents, empty lists files (`includeGlobs`, ...). */
export type SearchQuery = Omit<Init<typeof SearchRequestSchema>, '$typeName'>;

export interface SearchResult {
  hits: SearchHit[];
  summary: SearchSummary;
}

/** The fields of a message, all optional (the init shape of its plain object). */
type Fields<T> = Partial<Omit<T, '$typeName' | '$unknown'>>;

/** Exactly one of T's keys: an object naming two is refused by the compiler, not half ignored. */
type OneOf<T> = { [K in keyof T]: Pick<T, K> & { [Other in Exclude<keyof T, K>]?: never } }[keyof T];

/** One edit operation: exactly one of these keys, with the fields each needs. */
export type Edit = OneOf<{
  write: Fields<Omit<WriteFile, 'content'>> & { path: string; content: string | Uint8Array };
  replace: Fields<ReplaceText> & { path: string; oldText: string; newText: string };
  insert: Fields<InsertText> & { path: string; text: string };
  delete: Fields<DeletePath> & { path: string };
  move: Fields<MovePath> & { fromPath: string; toPath: string };
  makeDirectory: Fields<MakeDirectory> & { path: string };
}>;

export interface FollowOptions extends CallOptions {
  /** Resume from this sequence number (the last one seen plus one); 0 replays the whole buffer. */
  fromSequence?: bigint;
  onOutput?: (output: ProcessOutput) => void;
  /** How many dropped connections to resume after before giving up (default 5). */
  maxReconnects?: number;
}

export interface FollowResult {
  exited: ProcessExited;
  /** The sequence number after the last chunk delivered. */
  nextSequence: bigint;
  /** Chunks that had left the agent's bounded buffer before they could be replayed (0: nothing lost). */
  missedChunks: bigint;
  /** How many times the attachment was resumed after a dropped connection. */
  reconnects: number;
}

/** A running command: send it stdin, signals and sizes; `started` and `exited` follow its life. A failed
 * call (the command could not start, the connection dropped, cancelled) rejects both. */
export class RunningCommand {
  readonly started: Promise<ProcessStarted>;
  readonly exited: Promise<ProcessExited>;
  private readonly requests: RequestQueue<Init<typeof ExecRequestSchema>>;
  private readonly call: AbortController;

  constructor(
    requests: RequestQueue<Init<typeof ExecRequestSchema>>,
    call: AbortController,
    started: Promise<ProcessStarted>,
    exited: Promise<ProcessExited>,
  ) {
    this.requests = requests;
    this.call = call;
    this.started = started;
    this.exited = exited;
    // Either may be the only one a caller awaits: the other's rejection is not an unhandled one.
    started.catch(() => {});
    exited.catch(() => {});
  }

  /** Writes to the command's stdin (started with `openStdin`). */
  write(data: string | Uint8Array): void {
    this.send({ case: 'stdin', value: typeof data === 'string' ? Buffer.from(data) : data });
  }

  closeStdin(): void {
    this.send({ case: 'closeStdin', value: {} });
  }

  /** Sends a signal to the command's process group (SIGTERM by default). */
  kill(signal: Signal = Signal.SIGTERM): void {
    this.send({ case: 'signal', value: { signal } });
  }

  resize(rows: number, cols: number): void {
    this.send({ case: 'resize', value: { rows, cols } });
  }

  /** Ends the call: the agent kills the command's process group (a named process keeps running). */
  cancel(): void {
    this.call.abort();
  }

  private send(request: Init<typeof ExecRequestSchema>['request']): void {
    // After the exit the call is over: a late signal or write has nothing to reach.
    if (!this.requests.isEnded) this.requests.push({ request });
  }
}

/** The agent of one workspace; every call carries the session's bearer token. `close()` ends the connection. */
export class Agent {
  private readonly connection: Connection;
  private readonly client: Client<typeof AgentService>;

  constructor(endpoint: string, token: string) {
    this.connection = connect(endpoint, [bearer(token)]);
    this.client = createClient(AgentService, this.connection.transport);
  }

  /** A file (path relative to the workspace root), whole or a byte or line range of it. */
  async read(path: string, options: ReadOptions = {}): Promise<FileContent> {
    const { range, ...call } = options;
    const request = {
      path,
      range: range === undefined ? undefined
        : range.bytes !== undefined ? { case: 'bytes' as const, value: range.bytes }
        : { case: 'lines' as const, value: range.lines },
    };
    let info: FileInfo | undefined;
    const data: Uint8Array[] = [];
    for await (const { event } of streamed(this.client.read(request, call))) {
      if (event.case === 'info') info = event.value;
      else if (event.case === 'chunk') data.push(event.value.data);
    }
    if (info === undefined) throw new Error(`Read of ${path} ended without the file's info`);
    return { info, data: Buffer.concat(data) };
  }

  /** A UTF-8 text file's content. */
  async readText(path: string, options: ReadOptions = {}): Promise<string> {
    return (await this.read(path, options)).data.toString('utf8');
  }

  /** Searches contents (or lists files when `pattern` is empty); every hit, in file order, and the summary. */
  async search(query: SearchQuery, options: CallOptions = {}): Promise<SearchResult> {
    const hits: SearchHit[] = [];
    let summary: SearchSummary | undefined;
    for await (const response of streamed(this.client.search(query, options))) {
      hits.push(...response.hits);
      summary = response.summary ?? summary;
    }
    if (summary === undefined) throw new Error('Search ended without its summary');
    return { hits, summary };
  }

  /** Applies the operations all-or-nothing (with `dryRun`, only computes the diff). */
  async edit(edits: Edit[], options: CallOptions & { dryRun?: boolean } = {}): Promise<EditResponse> {
    const { dryRun = false, ...call } = options;
    const operations = edits.map(editOperation);
    return unary(() => this.client.edit({ operations, dryRun }, call));
  }

  /**
   * Starts a command and returns at once: send it stdin and signals through the handle, get its output
   * through `onOutput`. Cancelling (`signal`) or a deadline kills the command's process group.
   */
  start(command: Command, options: StartOptions = {}): RunningCommand {
    return this.run(command, '', options);
  }

  /** Runs a command to its end; resolves with its exit (a non-zero exit code is not an error). */
  async exec(command: Command, options: ExecOptions = {}): Promise<ProcessExited> {
    const { stdin, ...rest } = options;
    const running = this.start(command, { ...rest, openStdin: rest.openStdin ?? stdin !== undefined });
    if (stdin !== undefined) {
      const source = typeof stdin === 'string' || stdin instanceof Uint8Array ? [stdin] : stdin;
      await running.started;
      try {
        for await (const chunk of chunks(source)) running.write(chunk);
      } catch (error) {
        running.cancel(); // the input failed: the command must not wait for the rest of it
        throw error;
      }
      running.closeStdin();
    }
    return running.exited;
  }

  /** Starts a named process (a dev server): it outlives this call and can be followed, listed and stopped. */
  async startProcess(name: string, command: Command, options: Omit<StartOptions, 'onOutput' | 'openStdin' | 'killAfterMs'> = {}): Promise<ProcessStarted> {
    const running = this.run(command, name, options);
    try {
      return await running.started;
    } finally {
      running.cancel(); // leaving the Exec call leaves a named process running
    }
  }

  /** Attaches to a named process: its buffered output from `fromSequence`, then live, then its exit. */
  attach(name: string, options: CallOptions & { fromSequence?: bigint } = {}): AsyncIterable<AttachProcessResponse['event']> {
    const { fromSequence = 0n, ...call } = options;
    const responses = streamed(this.client.attachProcess({ name, fromSequence }, call));
    return (async function* events() {
      for await (const response of responses) yield response.event;
    })();
  }

  /**
   * Follows a named process to its exit, each output chunk handed to `onOutput` exactly once and in order.
   * When the connection drops (the call fails as a reset or closed connection does, see CONNECTION_LOSS, or
   * the stream ends before the exit) it attaches again from the sequence after the last chunk delivered, so
   * nothing is lost or repeated. Attaching is read-only, so trying again is safe. `timeoutMs` bounds the whole
   * follow, reconnections included.
   */
  async follow(name: string, options: FollowOptions = {}): Promise<FollowResult> {
    const { fromSequence = 0n, onOutput, maxReconnects = 5, signal, timeoutMs } = options;
    // One deadline for the whole follow, however many times it attaches.
    const deadline = timeoutMs === undefined ? undefined : Date.now() + timeoutMs;
    let next = fromSequence;
    let missedChunks = 0n;
    let reconnects = 0;
    for (;;) {
      try {
        const remainingMs = deadline === undefined ? undefined : Math.max(1, deadline - Date.now());
        for await (const event of this.attach(name, { signal, timeoutMs: remainingMs, fromSequence: next })) {
          if (event.case === 'attached') missedChunks += event.value.missedChunks;
          else if (event.case === 'output') {
            if (event.value.sequence < next) continue; // already delivered before the drop
            onOutput?.(event.value);
            next = event.value.sequence + 1n;
          } else if (event.case === 'exited') return { exited: event.value, nextSequence: next, missedChunks, reconnects };
        }
      } catch (error) {
        if (signal?.aborted || !isConnectionLoss(error) || reconnects >= maxReconnects) throw error;
      }
      if (reconnects >= maxReconnects) throw new Error(`the attachment to ${name} kept ending before the process exited`);
      reconnects += 1;
      await pause(100 * reconnects, signal);
    }
  }

  async listProcesses(options: CallOptions = {}): Promise<ProcessInfo[]> {
    return (await unary(() => this.client.listProcesses({}, options))).processes;
  }

  /** Stops a named process (SIGTERM, then SIGKILL after the grace period) and resolves with its exit. */
  async stopProcess(
    name: string,
    options: CallOptions & { stopSignal?: Signal; gracePeriodMs?: number; remove?: boolean } = {},
  ): Promise<ProcessExited> {
    const { stopSignal = Signal.UNSPECIFIED, gracePeriodMs, remove = false, ...call } = options;
    const gracePeriod = gracePeriodMs === undefined ? undefined : durationFromMs(gracePeriodMs);
    const { exited } = await unary(() => this.client.stopProcess({ name, signal: stopSignal, gracePeriod, remove }, call));
    if (exited === undefined) throw new Error(`StopProcess of ${name} answered without the exit`);
    return exited;
  }

  /** Extracts a tar.gz (a Readable, or any async iterable of bytes) into a directory, all-or-nothing. */
  async extractArchive(
    source: ByteSource,
    spec: { destination?: string; mode?: ExtractMode; expectedSha256?: string } = {},
    options: CallOptions = {},
  ): Promise<ExtractArchiveResponse> {
    async function* requests() {
      yield create(ExtractArchiveRequestSchema, { request: { case: 'spec', value: spec } });
      for await (const chunk of chunks(source)) {
        yield create(ExtractArchiveRequestSchema, { request: { case: 'chunk', value: chunk } });
      }
    }
    return unary(() => this.client.extractArchive(requests(), options));
  }

  /** A directory as a tar.gz Readable; `meta` is the summary (sha256, size, counts), sent last. */
  createArchive(path = '', options: CallOptions & { excludes?: string[]; noDefaultExcludes?: boolean } = {}): Download<ArchiveSummary> {
    const { excludes = [], noDefaultExcludes = false, ...call } = options;
    return download<CreateArchiveResponse, ArchiveSummary>(
      () => streamed(this.client.createArchive({ path, excludes, noDefaultExcludes }, call)),
      ({ event }) => (event.case === 'chunk' ? { chunk: event.value } : event.case === 'summary' ? { meta: event.value } : undefined),
    );
  }

  async getActivity(options: CallOptions = {}): Promise<GetActivityResponse> {
    return unary(() => this.client.getActivity({}, options));
  }

  close(): void {
    this.connection.close();
  }

  private run(command: Command, name: string, options: StartOptions): RunningCommand {
    const { cwd = '', env = {}, killAfterMs, pty, openStdin = false, onOutput, signal, timeoutMs } = options;
    const cancel = new AbortController();
    const call = { signal: signal === undefined ? cancel.signal : AbortSignal.any([signal, cancel.signal]), timeoutMs };
    const start: Init<typeof ExecStartSchema> = {
      ...('argv' in command && command.argv !== undefined ? { argv: command.argv } : { shell: command.shell }),
      cwd,
      env,
      name,
      openStdin,
      pty,
      timeout: killAfterMs === undefined ? undefined : durationFromMs(killAfterMs),
    };
    const requests = new RequestQueue<Init<typeof ExecRequestSchema>>();
    requests.push({ request: { case: 'start', value: start } });
    let started!: { resolve: (value: ProcessStarted) => void; reject: (error: unknown) => void };
    const startedPromise = new Promise<ProcessStarted>((resolve, reject) => (started = { resolve, reject }));
    const exited = (async () => {
      try {
        for await (const { event } of streamed(this.client.exec(requests, call))) {
          if (event.case === 'started') started.resolve(event.value);
          else if (event.case === 'output') onOutput?.(event.value);
          else if (event.case === 'exited') return event.value;
        }
        throw new Error('Exec ended without the exit status');
      } catch (error) {
        started.reject(error);
        throw error;
      } finally {
        requests.end();
        started.reject(new Error('the command ended before it started')); // no-op once it started
      }
    })();
    return new RunningCommand(requests, cancel, startedPromise, exited);
  }
}

function editOperation(edit: Edit): Init<typeof EditOperationSchema> {
  if (edit.write !== undefined) {
    const { content, ...write } = edit.write;
    return { operation: { case: 'write', value: { ...write, content: typeof content === 'string' ? Buffer.from(content) : content } } };
  }
  if (edit.replace !== undefined) return { operation: { case: 'replace', value: edit.replace } };
  if (edit.insert !== undefined) return { operation: { case: 'insert', value: edit.insert } };
  if (edit.delete !== undefined) return { operation: { case: 'delete', value: edit.delete } };
  if (edit.move !== undefined) return { operation: { case: 'move', value: edit.move } };
  return { operation: { case: 'makeDirectory', value: edit.makeDirectory } };
}

// How a dropped connection surfaces through Node's HTTP/2 client: its streams closed with CANCEL (CANCELLED),
// ECONNRESET (ABORTED), a refused or timed-out connect (UNAVAILABLE), a session closed mid-frame (INTERNAL).
// CANCELLED is a drop only while the caller's own signal is not aborted (`follow` checks it first).
const CONNECTION_LOSS: ReadonlySet<Code> = new Set([Code.Canceled, Code.Unavailable, Code.Aborted, Code.Internal]);

function isConnectionLoss(error: unknown): boolean {
  return error instanceof WorkspaceError && CONNECTION_LOSS.has(error.code);
}

function pause(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(workspaceError(signal.reason));
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(workspaceError(signal.reason));
    }, { once: true });
  });
}
