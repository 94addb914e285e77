// The whole life of a workspace from a Node.js backend: create a session, wait for READY, read a file, run a
// command with its output streamed, delete the session.
//
// Usage: node example.js [ORCHESTRATOR_ADDRESS] [TEMPLATE]   (defaults: 127.0.0.1:50051 node-basic)

import { Workspaces } from './workspace.js';

const [address = '127.0.0.1:50051', template = 'node-basic'] = process.argv.slice(2);

const workspaces = new Workspaces(address);
const session = await workspaces.createSession(template, { app: 'node-example' });
console.log(`session ${session.id}: ${session.state}`);
try {
  const ready = await workspaces.waitReady(session.id, (event) => {
    if (event.event === 'phase') console.log(`phase ${event.phase.phase}: ${event.phase.outcome}`);
  });
  console.log(`ready: preview ${ready.preview_url}, agent ${ready.agent_endpoint}`);

  const agent = workspaces.agent(ready);
  try {
    const manifest = JSON.parse(await agent.readFile('package.json'));
    console.log(`package.json names ${manifest.name}`);

    const exited = await agent.exec('node --version && ls', {
      onOutput: (data, stream) => (stream === 'OUTPUT_STREAM_STDERR' ? process.stderr : process.stdout).write(data),
    });
    console.log(`exit code ${exited.exit_code}`);
    if (exited.exit_code !== 0) process.exitCode = 1;
  } finally {
    agent.close();
  }
} finally {
  await workspaces.deleteSession(session.id);
  console.log(`deleted ${session.id}`);
  workspaces.close();
}
