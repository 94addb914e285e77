// The whole life of a workspace from a TypeScript backend: create a session, follow it to READY, read a file,
// run a command with its output streamed, delete the session. Build with `npm run build`, then
// `node dist/examples/example.js [ORCHESTRATOR_ADDRESS] [TEMPLATE]` (defaults: 127.0.0.1:50051 node-basic).

import { OutputStream, Phase, PhaseOutcome, SessionState, Workspaces } from '../src/index.js';

const [address = '127.0.0.1:50051', template = 'node-basic'] = process.argv.slice(2);

const workspaces = new Workspaces(address);
const created = await workspaces.createSession({ template }, { labels: { app: 'node-example' } });
console.log(`session ${created.id}: ${SessionState[created.state]}`);
try {
  const session = await workspaces.waitReady(created.id, {
    onEvent: (event) => {
      if (event.case === 'phase') console.log(`phase ${Phase[event.value.phase]}: ${PhaseOutcome[event.value.outcome]}`);
    },
  });
  console.log(`ready: preview ${session.previewUrl}, agent ${session.agentEndpoint}`);

  const agent = workspaces.agent(session);
  try {
    const manifest = JSON.parse(await agent.readText('package.json')) as { name: string };
    console.log(`package.json names ${manifest.name}`);

    const exited = await agent.exec({ shell: 'node --version && ls' }, {
      onOutput: ({ stream, data }) => (stream === OutputStream.STDERR ? process.stderr : process.stdout).write(data),
    });
    console.log(`exit code ${exited.exitCode}`);
    if (exited.exitCode !== 0) process.exitCode = 1;
  } finally {
    agent.close();
  }
} finally {
  await workspaces.deleteSession(created.id);
  console.log(`deleted ${created.id}`);
  workspaces.close();
}
