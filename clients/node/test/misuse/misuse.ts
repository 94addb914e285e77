// Misuses of the typed client that `tsc` must refuse: tests/test_node_client.py compiles this file and
// expects exactly the error marked on each line (`// error TSnnnn`, and the words its message must hold
// after a colon), and no other: the unmarked lines are correct uses.

import { create } from '@bufbuild/protobuf';
import { Agent, Signal, SessionState, Workspaces, agentv1, orchestratorv1 } from '../../src/index.js';

export async function misuse(workspaces: Workspaces, agent: Agent): Promise<void> {
  await workspaces.getSession(42); // error TS2345
  await workspaces.getSession(); // error TS2554: Expected 1-2 arguments, but got 0
  await workspaces.createSession({}); // error TS2345
  await workspaces.createSession({ template: 'node-basic', archiveId: 'ar-1' }); // error TS2345
  await workspaces.createSession({ template: 'node-basic' }, { labels: { team: 7 } }); // error TS2322
  const session = await workspaces.waitReady('ws-1');
  if (session.state === 'READY') return; // error TS2367
  const port: number = session.agentEndpoint; // error TS2322

  await agent.exec({ cwd: 'src' }); // error TS2353: 'cwd' does not exist in type 'Command'
  await agent.follow('dev', { fromSequence: 3 }); // error TS2322
  await agent.edit([{ replace: { path: 'a.txt', oldText: 'x' } }]); // error TS2322: Property 'newText' is missing
  await agent.stopProcess('dev', { stopSignal: 'SIGTERM' }); // error TS2322
  await agent.edit([{ delete: { path: 'a' }, move: { fromPath: 'a', toPath: 'b' } }]); // error TS2322
  await agent.read('a.txt', { range: { lines: { start: 1n } } });
  agent.start({ shell: 'cat' }).kill(Signal.SIGTERM);

  const missingId: orchestratorv1.GetSessionRequest = { $typeName: 'workspace.orchestrator.v1.GetSessionRequest' }; // error TS2322: Property 'id' is missing
  create(agentv1.ExecStartSchema, { shell: ['ls'] }); // error TS2322
  create(orchestratorv1.ListSessionsRequestSchema, { states: [SessionState.READY, 'FAILED'] }); // error TS2322
  create(agentv1.ReadRequestSchema, { paht: 'package.json' }); // error TS2353
  void port;
  void missingId;
}
