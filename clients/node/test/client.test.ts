// The typed client against a real orchestrator (WORKSPACE_ORCHESTRATOR, started by tests/test_node_client.py
// with the local runtime): one session for most tests, followed to READY; every call through the client.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, test } from 'node:test';
import {
  Agent,
  AlreadyExistsError,
  ArchiveSource,
  CancelledError,
  Code,
  DeadlineExceededError,
  ExtractMode,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  OutputStream,
  Phase,
  PhaseOutcome,
  type ProcessOutput,
  type Session,
  type SessionEvent,
  SessionState,
  Signal,
  UnauthenticatedError,
  WorkspaceError,
  Workspaces,
} from '../src/index.js';
import { WorkspacesService } from '../examples/nestjs/workspaces.service.js';
import { Proxy } from './proxy.js';

const address = process.env.WORKSPACE_ORCHESTRATOR;
if (address === undefined) throw new Error('set WORKSPACE_ORCHESTRATOR to a running orchestrator (host:port)');

const text = (chunks: ProcessOutput[]) => Buffer.concat(chunks.map((chunk) => chunk.data)).toString();
const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

describe('a session of node-basic', () => {
  const workspaces = new Workspaces(address);
  const events: SessionEvent[] = [];
  let session: Session;
  let agent: Agent;
  let scratch: string;

  before(async () => {
    const created = await workspaces.createSession({ template: 'node-basic' }, { labels: { test: 'typed-client' } });
    assert.match(created.id, /^ws-/);
    assert.ok([SessionState.PENDING, SessionState.STARTING].includes(created.state));
    session = await workspaces.waitReady(created.id, { onEvent: (event) => events.push(event) });
    agent = workspaces.agent(session);
    scratch = await mkdtemp(join(tmpdir(), 'typed-client-'));
  });

  after(async () => {
    agent?.close();
    if (session !== undefined) await workspaces.deleteSession(session.id);
    workspaces.close();
    if (scratch !== undefined) await rm(scratch, { recursive: true, force: true });
  });

  test('waitReady resolves READY with the agent set, after progress events of every phase', async () => {
    assert.equal(session.state, SessionState.READY);
    assert.match(session.agentEndpoint, /^127\.0\.0\.1:\d+$/);
    assert.notEqual(session.agentToken, '');
    const phases = events.flatMap((event) => (event.case === 'phase' ? [event.value] : []));
    assert.ok(phases.some((phase) => phase.phase === Phase.READY && phase.outcome === PhaseOutcome.SUCCEEDED));
    assert.ok(phases.some((phase) => phase.phase === Phase.AGENT_HEALTHY));
    const last = events.at(-1);
    assert.equal(last?.case, 'session');
    assert.equal(last?.case === 'session' && last.value.state, SessionState.READY);
    assert.equal((await workspaces.getSession(session.id)).state, SessionState.READY);
    const mine = await workspaces.listSessions({ labels: { test: 'typed-client' } });
    assert.ok(mine.some((listed) => listed.id === session.id));
  });

  test('read returns the file and its info; a line range only those lines', async () => {
    const { info, data } = await agent.read('package.json');
    assert.equal(JSON.parse(data.toString()).name, 'node-basic');
    assert.equal(info.size, BigInt(data.length));
    assert.equal(info.sha256, sha256(data));
    const firstLines = await agent.readText('package.json', { range: { lines: { start: 1n, end: 2n } } });
    assert.equal(firstLines, data.toString().split('\n').slice(0, 2).join('\n') + '\n');
  });

  test('a missing file is a NotFoundError carrying the status and the message', async () => {
    const error = await agent.read('no/such/file.txt').then(() => null, (caught: unknown) => caught);
    assert.ok(error instanceof NotFoundError, String(error));
    assert.ok(error instanceof WorkspaceError);
    assert.equal(error.code, Code.NotFound);
    assert.equal(error.status, 'NOT_FOUND');
    assert.match(error.details, /no\/such\/file\.txt/);
    assert.equal(error.message, `NOT_FOUND: ${error.details}`);
    await assert.rejects(agent.read('../outside'), InvalidArgumentError);
  });

  test('a wrong token is an UnauthenticatedError', async () => {
    const intruder = new Agent(session.agentEndpoint, 'not-the-token');
    try {
      await assert.rejects(intruder.listProcesses(), UnauthenticatedError);
    } finally {
      intruder.close();
    }
  });

  test('search finds matches with their lines, and lists files by glob', async () => {
    const { hits, summary } = await agent.search({ pattern: 'createServer', includeGlobs: ['*.js'] });
    const matches = hits.flatMap((hit) => (hit.hit.case === 'match' ? [hit.hit.value] : []));
    assert.ok(matches.some((match) => match.path === 'server.js' && match.line.includes('createServer')));
    assert.equal(summary.results, BigInt(matches.length));
    const listed = await agent.search({ includeGlobs: ['src/**'] });
    const files = listed.hits.flatMap((hit) => (hit.hit.case === 'file' ? [hit.hit.value.path] : []));
    assert.deepEqual(files.sort(), ['src/index.html', 'src/style.css']);
  });

  test('edit writes, replaces and diffs; a stale sha256 is a FailedPreconditionError and changes nothing', async () => {
    const written = await agent.edit([
      { makeDirectory: { path: 'notes' } },
      { write: { path: 'notes/todo.txt', content: 'one\ntwo\n' } },
      { replace: { path: 'notes/todo.txt', oldText: 'two', newText: 'three' } },
    ]);
    const todo = written.files.find((file) => file.path === 'notes/todo.txt');
    assert.equal(todo?.sha256, sha256(Buffer.from('one\nthree\n')));
    assert.equal(await agent.readText('notes/todo.txt'), 'one\nthree\n');

    const preview = await agent.edit([{ insert: { path: 'notes/todo.txt', line: 1n, text: 'zero\n' } }], { dryRun: true });
    assert.match(preview.diff, /^\+zero$/m);
    assert.equal(await agent.readText('notes/todo.txt'), 'one\nthree\n');

    const stale = agent.edit([
      { write: { path: 'notes/todo.txt', content: 'lost', expectedSha256: sha256(Buffer.from('old')) } },
    ]);
    await assert.rejects(stale, (error: unknown) => error instanceof FailedPreconditionError && error.code === Code.FailedPrecondition);
    await assert.rejects(agent.edit([{ write: { path: 'notes/todo.txt', content: 'x', createOnly: true } }]), AlreadyExistsError);
    assert.equal(await agent.readText('notes/todo.txt'), 'one\nthree\n');
  });

  test('exec streams stdout and stderr in order and resolves with the exit', async () => {
    const output: ProcessOutput[] = [];
    const exited = await agent.exec({ shell: 'echo out; echo err >&2; exit 3' }, { onOutput: (chunk) => output.push(chunk) });
    assert.equal(exited.exitCode, 3);
    assert.equal(text(output.filter((chunk) => chunk.stream === OutputStream.STDOUT)), 'out\n');
    assert.equal(text(output.filter((chunk) => chunk.stream === OutputStream.STDERR)), 'err\n');
    assert.deepEqual(output.map((chunk) => chunk.sequence), output.map((_, index) => BigInt(index)));

    const args: ProcessOutput[] = [];
    await agent.exec({ argv: ['printf', '%s|', 'a b', 'c'] }, { onOutput: (chunk) => args.push(chunk) });
    assert.equal(text(args), 'a b|c|');
  });

  test('exec feeds stdin; a started command takes writes and a signal', async () => {
    const echoed: ProcessOutput[] = [];
    const exited = await agent.exec({ argv: ['wc', '-c'] }, { stdin: Readable.from([Buffer.from('12345'), 'abc']), onOutput: (chunk) => echoed.push(chunk) });
    assert.equal(exited.exitCode, 0);
    assert.equal(text(echoed).trim(), '8');

    async function* brokenInput() {
      yield 'partial';
      throw new Error('the input broke');
    }
    await assert.rejects(agent.exec({ argv: ['cat'] }, { stdin: brokenInput() }), /the input broke/);

    const lines: ProcessOutput[] = [];
    let answered!: () => void;
    const firstLine = new Promise<void>((resolve) => (answered = resolve));
    const cat = agent.start({ argv: ['cat'] }, { openStdin: true, onOutput: (chunk) => { lines.push(chunk); answered(); } });
    const { pid } = await cat.started;
    assert.ok(pid > 0);
    cat.write('hello\n');
    await firstLine;
    cat.kill(Signal.SIGTERM);
    const killed = await cat.exited;
    assert.equal(killed.signal, 15);
    assert.equal(killed.exitCode, -1);
    assert.equal(text(lines), 'hello\n');
  });

  test('a deadline is a DeadlineExceededError; aborting the signal is a CancelledError', async () => {
    await assert.rejects(agent.exec({ shell: 'sleep 60' }, { timeoutMs: 300 }), DeadlineExceededError);

    const controller = new AbortController();
    const sleeper = agent.start({ shell: 'sleep 60' }, { signal: controller.signal });
    await sleeper.started;
    controller.abort();
    await assert.rejects(sleeper.exited, CancelledError);
    await assert.rejects(sleeper.started.then(() => sleeper.exited), (error: unknown) => error instanceof CancelledError && error.code === Code.Canceled);
  });

  test('a named process is followed through a dropped connection: nothing lost, nothing repeated', async () => {
    const proxy = await Proxy.start(session.agentEndpoint);
    const proxied = workspaces.agent(session, { endpoint: proxy.address });
    try {
      // Five lines, then it waits for a gate file that the test creates only after it cut the connection:
      // lines 6-10 are written while the follower is away, and must come from the agent's replay buffer.
      const script = 'for i in 1 2 3 4 5; do echo line $i; done; while [ ! -e gate ]; do sleep 0.02; done; for i in 6 7 8 9 10; do echo line $i; done';
      await agent.startProcess('counter', { shell: script });
      const seen: ProcessOutput[] = [];
      let opened: Promise<unknown> | undefined;
      const result = await proxied.follow('counter', {
        onOutput: (chunk) => {
          seen.push(chunk);
          if (opened === undefined && text(seen).includes('line 5\n')) {
            proxy.drop();
            opened = agent.edit([{ write: { path: 'gate', content: '' } }]);
          }
        },
      });
      await opened;
      assert.equal(proxy.drops, 1);
      assert.ok(result.reconnects >= 1, `resumed ${result.reconnects} times`);
      assert.equal(result.exited.exitCode, 0);
      assert.equal(result.missedChunks, 0n);
      assert.equal(text(seen), Array.from({ length: 10 }, (_, index) => `line ${index + 1}\n`).join(''));
      assert.deepEqual(seen.map((chunk) => chunk.sequence), seen.map((_, index) => BigInt(index)));
      assert.equal(result.nextSequence, BigInt(seen.length));

      const [listed] = (await agent.listProcesses()).filter((process) => process.name === 'counter');
      assert.equal(listed?.running, false);
      assert.equal(listed?.nextSequence, BigInt(seen.length));
      // Attaching from a sequence replays only the rest (there are at least two chunks: before and after the gate).
      const tail: ProcessOutput[] = [];
      await agent.follow('counter', { fromSequence: 1n, onOutput: (chunk) => tail.push(chunk) });
      assert.equal(tail[0]?.sequence, 1n);
      assert.equal(text(tail), text(seen.slice(1)));
    } finally {
      proxied.close();
      await proxy.close();
    }
  });

  test('a named process is listed running and stopped with its signal', async () => {
    await agent.startProcess('sleeper', { shell: 'sleep 60' });
    const running = (await agent.listProcesses()).find((process) => process.name === 'sleeper');
    assert.equal(running?.running, true);
    await assert.rejects(agent.startProcess('sleeper', { shell: 'sleep 1' }), AlreadyExistsError);
    const exited = await agent.stopProcess('sleeper', { stopSignal: Signal.SIGINT, remove: true });
    assert.equal(exited.signal, 2);
    assert.ok(!(await agent.listProcesses()).some((process) => process.name === 'sleeper'));
    await assert.rejects(agent.follow('sleeper'), NotFoundError);
  });

  test('archives go out and in as Node streams', async () => {
    const archivePath = join(scratch, 'workspace.tar.gz');
    const archive = agent.createArchive('src');
    await pipeline(archive, createWriteStream(archivePath));
    const bytes = await readFile(archivePath);
    const summary = await archive.meta;
    assert.equal(summary.sha256, sha256(bytes));
    assert.equal(summary.size, BigInt(bytes.length));
    assert.equal(summary.files, 2n);

    const extracted = await agent.extractArchive(createReadStream(archivePath), {
      destination: 'copy',
      mode: ExtractMode.REPLACE,
      expectedSha256: summary.sha256,
    });
    assert.equal(extracted.files, 2n);
    assert.equal(extracted.sha256, summary.sha256);
    assert.equal(await agent.readText('copy/index.html'), await agent.readText('src/index.html'));

    await assert.rejects(agent.extractArchive([bytes], { destination: 'copy', expectedSha256: sha256(Buffer.from('other')) }), (error: unknown) => error instanceof WorkspaceError && error.status === 'DATA_LOSS');
  });

  test('a saved session restores with its files; an uploaded archive is listed', async () => {
    await agent.edit([{ write: { path: 'saved.txt', content: 'kept' } }]);
    const saved = await workspaces.saveSession(session.id, { name: 'typed-client' });
    assert.equal(saved.source, ArchiveSource.SAVED);
    const restored = await workspaces.waitReady((await workspaces.createSession({ archiveId: saved.id })).id);
    const restoredAgent = workspaces.agent(restored);
    try {
      assert.equal(await restoredAgent.readText('saved.txt'), 'kept');
    } finally {
      restoredAgent.close();
      await workspaces.deleteSession(restored.id);
    }

    const template = workspaces.downloadTemplate('node-basic');
    const templatePath = join(scratch, 'node-basic.tar.gz');
    await pipeline(template, createWriteStream(templatePath));
    const info = await template.meta;
    assert.equal(info.sha256, sha256(await readFile(templatePath)));
    const uploaded = await workspaces.uploadArchive(createReadStream(templatePath), { template: 'node-basic', name: 'uploaded', expectedSha256: info.sha256 });
    assert.equal(uploaded.source, ArchiveSource.UPLOADED);
    assert.equal(uploaded.sha256, info.sha256);
    assert.ok((await workspaces.listArchives()).some((listed) => listed.id === uploaded.id));
    await workspaces.deleteArchive(uploaded.id);
    await workspaces.deleteArchive(saved.id);
    await assert.rejects(workspaces.deleteArchive(saved.id), NotFoundError);
  });

  test('a fork has the files of its source and a token of its own; a paused session resumes with its files', async () => {
    await agent.edit([{ write: { path: 'forked.txt', content: 'from the source' } }]);
    const { session: created, archive } = await workspaces.forkSession(session.id, { labels: { fork: 'yes' } });
    assert.equal(archive, undefined);
    assert.equal(created.forkedFrom, session.id);
    const fork = await workspaces.waitReady(created.id);
    assert.notEqual(fork.agentToken, session.agentToken);
    assert.equal(fork.labels.fork, 'yes');
    const forkAgent = workspaces.agent(fork);
    try {
      assert.equal(await forkAgent.readText('forked.txt'), 'from the source');
      await forkAgent.edit([{ write: { path: 'forked.txt', content: 'paused and resumed' } }]);
    } finally {
      forkAgent.close();
    }
    assert.equal((await workspaces.pauseSession(fork.id)).state, SessionState.PAUSED);
    assert.ok([SessionState.STARTING, SessionState.READY].includes((await workspaces.resumeSession(fork.id)).state));
    const resumed = await workspaces.waitReady(fork.id);
    const resumedAgent = workspaces.agent(resumed);
    try {
      assert.equal(await resumedAgent.readText('forked.txt'), 'paused and resumed');
    } finally {
      resumedAgent.close();
      await workspaces.deleteSession(fork.id);
    }
    await assert.rejects(workspaces.pauseSession(fork.id), (error: unknown) => error instanceof WorkspaceError);
  });

  test('a preview token is minted with its expiry; no gateway, no URL; a bad ttl is an InvalidArgumentError', async () => {
    const before = Date.now();
    const minted = await workspaces.createPreviewToken(session.id, { ttlMs: 60_000 });
    assert.ok(minted.token.length > 20);
    assert.ok(minted.expiresAt !== undefined && Math.abs(minted.expiresAt.getTime() - (before + 60_000)) < 10_000);
    assert.equal(minted.url, '');
    assert.equal(minted.pathUrl, '');
    await assert.rejects(workspaces.createPreviewToken(session.id, { ttlMs: 10 }), InvalidArgumentError);
  });

  test('the NestJS provider of the example runs a command through the same client', async () => {
    const service = new WorkspacesService({ address });
    try {
      const result = await service.run(session.id, 'node --version');
      assert.equal(result.exitCode, 0);
      assert.match(result.stdout, /^v\d+\.\d+\.\d+\n$/);
    } finally {
      service.onModuleDestroy();
    }
  });
});

test('getPools reports the warm pool the orchestrator keeps by default, and no hot pool', async () => {
  const workspaces = new Workspaces(address);
  try {
    const { warm, hot } = await workspaces.getPools();
    assert.ok(warm !== undefined);
    assert.equal(warm.template, '');
    assert.ok(warm.size > 0 && warm.target <= warm.size && warm.ready + warm.preparing <= warm.target, JSON.stringify(warm));
    assert.deepEqual(hot, []);
  } finally {
    workspaces.close();
  }
});

test('an unknown template is a NotFoundError from the orchestrator', async () => {
  const workspaces = new Workspaces(address);
  try {
    await assert.rejects(workspaces.createSession({ template: 'no-such-template' }), (error: unknown) => error instanceof NotFoundError && /no-such-template/.test(error.details));
  } finally {
    workspaces.close();
  }
});
