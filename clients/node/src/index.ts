// The typed client of workspace-core: Workspaces (the orchestrator), Agent (one workspace), typed errors, and
// every message and enum of the contract, generated from protos/ by protoc-gen-es.

export { Workspaces, type SessionEvent, type SessionFilter, type SessionSource, type WaitOptions } from './workspaces.js';
export {
  Agent,
  RunningCommand,
  type Command,
  type Edit,
  type ExecOptions,
  type FileContent,
  type FollowOptions,
  type FollowResult,
  type ReadOptions,
  type SearchQuery,
  type SearchResult,
  type StartOptions,
} from './agent.js';
export * from './errors.js';
export type { CallOptions } from './transport.js';
export type { ByteSource, Download } from './streams.js';
export * as agentv1 from './gen/workspace/agent/v1/agent_pb.js';
export * as orchestratorv1 from './gen/workspace/orchestrator/v1/orchestrator_pb.js';
export { ArchiveFormat, ExtractMode, OutputStream, Signal } from './gen/workspace/agent/v1/agent_pb.js';
export { ArchiveSource, Phase, PhaseOutcome, SessionState } from './gen/workspace/orchestrator/v1/orchestrator_pb.js';
export type { ProcessExited, ProcessInfo, ProcessOutput, ProcessStarted } from './gen/workspace/agent/v1/agent_pb.js';
export type { Archive, Pool, Session, Template } from './gen/workspace/orchestrator/v1/orchestrator_pb.js';
