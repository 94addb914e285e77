// A NestJS provider wrapping the typed client: one orchestrator connection per application, agents opened
// per call, closed when Nest shuts the module down. Inject it anywhere: `constructor(private workspaces: WorkspacesService)`.

import 'reflect-metadata';
import { Inject, Injectable, type OnModuleDestroy } from '@nestjs/common';
import { OutputStream, type Session, Workspaces } from '../../src/index.js';

export const WORKSPACES_OPTIONS = Symbol('WORKSPACES_OPTIONS');

export interface WorkspacesOptions {
  /** The orchestrator's address, `host:port`. */
  address: string;
}

export interface CommandResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

@Injectable()
export class WorkspacesService implements OnModuleDestroy {
  readonly client: Workspaces;

  constructor(@Inject(WORKSPACES_OPTIONS) options: WorkspacesOptions) {
    this.client = new Workspaces(options.address);
  }

  /** A new session of `template`, READY (its install and dev server done). */
  async open(template: string, labels: Record<string, string> = {}): Promise<Session> {
    const { id } = await this.client.createSession({ template }, { labels });
    return this.client.waitReady(id, { timeoutMs: 120_000 });
  }

  /** Runs a shell command in a session and collects its output. */
  async run(sessionId: string, shell: string, signal?: AbortSignal): Promise<CommandResult> {
    const agent = this.client.agent(await this.client.getSession(sessionId));
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    try {
      const exited = await agent.exec({ shell }, {
        ...(signal === undefined ? {} : { signal }),
        onOutput: ({ stream, data }) => (stream === OutputStream.STDERR ? stderr : stdout).push(Buffer.from(data)),
      });
      return { exitCode: exited.exitCode, stdout: Buffer.concat(stdout).toString(), stderr: Buffer.concat(stderr).toString() };
    } finally {
      agent.close();
    }
  }

  async close(sessionId: string): Promise<void> {
    await this.client.deleteSession(sessionId);
  }

  onModuleDestroy(): void {
    this.client.close();
  }
}
