// A thin Node.js client for workspace-core: the orchestrator (sessions) and each session's agent (files,
// commands), using @grpc/grpc-js with the .proto files of the repository loaded at runtime.

import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const DEFAULT_PROTOS = fileURLToPath(new URL('../../protos', import.meta.url));

// Field names as in the .proto files (snake_case), enums as their names, 64-bit integers as strings, unset
// fields with their defaults, and a property naming the set field of each oneof (`event: 'session'`).
const LOADER_OPTIONS = { keepCase: true, enums: String, longs: String, defaults: true, oneofs: true };

/** Loads the two services from `protosDir` (the repository's protos/ by default). */
export function loadContract(protosDir = process.env.WORKSPACE_PROTOS ?? DEFAULT_PROTOS) {
  const definition = protoLoader.loadSync(
    ['workspace/orchestrator/v1/orchestrator.proto', 'workspace/agent/v1/agent.proto'],
    { ...LOADER_OPTIONS, includeDirs: [protosDir] },
  );
  const root = grpc.loadPackageDefinition(definition);
  return {
    OrchestratorService: root.workspace.orchestrator.v1.OrchestratorService,
    AgentService: root.workspace.agent.v1.AgentService,
  };
}

/** A gRPC error carrying the status code name, e.g. `NOT_FOUND: unknown template 'x'`. */
function describe(error) {
  return Object.assign(new Error(`${grpc.status[error.code] ?? error.code}: ${error.details}`), { code: error.code });
}

function unary(client, method, request, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, (error, response) => (error ? reject(describe(error)) : resolve(response)));
  });
}

/** Sessions: create, wait until ready, delete. One instance per orchestrator address. */
export class Workspaces {
  constructor(address, { contract = loadContract(), credentials = grpc.credentials.createInsecure() } = {}) {
    this.contract = contract;
    this.client = new contract.OrchestratorService(address, credentials);
  }

  /** Starts a session from a template; returns at once with the session (state PENDING). */
  async createSession(template, labels = {}) {
    const { session } = await unary(this.client, 'CreateSession', { template, labels });
    return session;
  }

  /**
   * Follows the session's progress until it is READY (resolves with the session) or FAILED (rejects with the
   * failed phase, the reason and the last output lines). `onEvent` sees every progress event on the way.
   */
  waitReady(id, onEvent = () => {}) {
    return new Promise((resolve, reject) => {
      const call = this.client.WatchSession({ id });
      let settled = false;
      const settle = (finish, value) => {
        settled = true;
        call.cancel();
        finish(value);
      };
      call.on('data', (event) => {
        onEvent(event);
        const session = event.session;
        if (event.event !== 'session' || settled) return;
        if (session.state === 'SESSION_STATE_READY') settle(resolve, session);
        else if (session.state === 'SESSION_STATE_FAILED') {
          const { phase, reason, last_output: lastOutput } = session.failure;
          settle(reject, new Error(`session ${id} failed in ${phase}: ${reason}\n${lastOutput.join('\n')}`));
        }
      });
      call.on('error', (error) => {
        if (!settled) reject(describe(error));
      });
      call.on('end', () => {
        if (!settled) reject(new Error(`session ${id} stopped before it was ready`));
      });
    });
  }

  /** Stops and removes the session's workspace. */
  async deleteSession(id) {
    await unary(this.client, 'DeleteSession', { id });
  }

  /** The agent of a session (needs `agent_endpoint` and `agent_token`, set once the session runs). */
  agent(session, credentials = grpc.credentials.createInsecure()) {
    return new Agent(this.contract, session.agent_endpoint, session.agent_token, credentials);
  }

  close() {
    this.client.close();
  }
}

/** One workspace's agent: every call carries the session's bearer token. */
export class Agent {
  constructor(contract, endpoint, token, credentials) {
    this.client = new contract.AgentService(endpoint, credentials);
    this.metadata = new grpc.Metadata();
    this.metadata.set('authorization', `Bearer ${token}`);
  }

  /** The whole content of a workspace file (path relative to the workspace root) as a Buffer. */
  readFile(path) {
    return new Promise((resolve, reject) => {
      const chunks = [];
      const call = this.client.Read({ path }, this.metadata);
      call.on('data', (event) => {
        if (event.event === 'chunk') chunks.push(event.chunk.data);
      });
      call.on('error', (error) => reject(describe(error)));
      call.on('end', () => resolve(Buffer.concat(chunks)));
    });
  }

  /**
   * Runs a shell command in the workspace, handing each output chunk to `onOutput(data, stream)` as it arrives
   * (stream: 'OUTPUT_STREAM_STDOUT' | 'OUTPUT_STREAM_STDERR'); resolves with the exit event
   * ({ exit_code, signal, timed_out, duration }).
   */
  exec(shell, { cwd = '', env = {}, onOutput = () => {} } = {}) {
    return new Promise((resolve, reject) => {
      const call = this.client.Exec(this.metadata);
      let exited = null;
      call.on('data', (event) => {
        if (event.event === 'output') onOutput(event.output.data, event.output.stream);
        else if (event.event === 'exited') {
          exited = event.exited;
          call.end();
        }
      });
      call.on('error', (error) => reject(describe(error)));
      call.on('end', () => (exited ? resolve(exited) : reject(new Error(`'${shell}' ended without an exit status`))));
      call.write({ start: { shell, cwd, env } });
    });
  }

  close() {
    this.client.close();
  }
}
