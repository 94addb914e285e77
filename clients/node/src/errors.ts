// Errors of the typed client: every failed call rejects with a WorkspaceError (a subclass per gRPC status
// the contract names) carrying the status and the server's message, so callers branch on `instanceof`.

import { Code, ConnectError } from '@connectrpc/connect';
import type { Phase, Session } from './gen/workspace/orchestrator/v1/orchestrator_pb.js';

export { Code };

// gRPC's own names, indexed by status number (Connect's `Code` has the same numbers, other spellings).
const STATUS_NAMES = [
  'OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND', 'ALREADY_EXISTS',
  'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED',
  'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED',
] as const;

export type StatusName = (typeof STATUS_NAMES)[number];

/** A call failed with a gRPC status: `code` (numeric, as Connect's `Code`), `status` ('NOT_FOUND') and the
 * server's message in `details`; `message` reads `NOT_FOUND: no such file: 'x'`. */
export class WorkspaceError extends Error {
  readonly code: Code;
  readonly status: StatusName;
  readonly details: string;

  constructor(code: Code, details: string, options?: { cause?: unknown }) {
    const status = STATUS_NAMES[code] ?? 'UNKNOWN';
    super(`${status}: ${details}`, options);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
    this.details = details;
  }
}

export class CancelledError extends WorkspaceError {}
export class UnknownError extends WorkspaceError {}
export class InvalidArgumentError extends WorkspaceError {}
export class DeadlineExceededError extends WorkspaceError {}
export class NotFoundError extends WorkspaceError {}
export class AlreadyExistsError extends WorkspaceError {}
export class PermissionDeniedError extends WorkspaceError {}
export class ResourceExhaustedError extends WorkspaceError {}
export class FailedPreconditionError extends WorkspaceError {}
export class AbortedError extends WorkspaceError {}
export class OutOfRangeError extends WorkspaceError {}
export class UnimplementedError extends WorkspaceError {}
export class InternalError extends WorkspaceError {}
export class UnavailableError extends WorkspaceError {}
export class DataLossError extends WorkspaceError {}
export class UnauthenticatedError extends WorkspaceError {}

const BY_CODE: Record<Code, typeof WorkspaceError> = {
  [Code.Canceled]: CancelledError,
  [Code.Unknown]: UnknownError,
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
  [Code.NotFound]: NotFoundError,
  [Code.AlreadyExists]: AlreadyExistsError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.ResourceExhausted]: ResourceExhaustedError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.Aborted]: AbortedError,
  [Code.OutOfRange]: OutOfRangeError,
  [Code.Unimplemented]: UnimplementedError,
  [Code.Internal]: InternalError,
  [Code.Unavailable]: UnavailableError,
  [Code.DataLoss]: DataLossError,
  [Code.Unauthenticated]: UnauthenticatedError,
};

/** The WorkspaceError for anything a call threw (a ConnectError, an abort, a socket error). */
export function workspaceError(error: unknown): WorkspaceError {
  if (error instanceof WorkspaceError) return error;
  const connect = ConnectError.from(error);
  return new BY_CODE[connect.code](connect.code, connect.rawMessage, { cause: error });
}

/** A session reached FAILED: the phase that failed, why, and the last lines that phase printed. */
export class SessionFailedError extends Error {
  readonly session: Session;
  readonly phase: Phase;
  readonly reason: string;
  readonly lastOutput: string[];

  constructor(session: Session) {
    const failure = session.failure;
    const lastOutput = failure?.lastOutput ?? [];
    super(`session ${session.id} failed: ${failure?.reason ?? 'no reason given'}${lastOutput.map((line) => `\n  ${line}`).join('')}`);
    this.name = 'SessionFailedError';
    this.session = session;
    this.phase = failure?.phase ?? session.phase;
    this.reason = failure?.reason ?? '';
    this.lastOutput = lastOutput;
  }
}

/** Runs a unary call, rethrowing its failure as a WorkspaceError. */
export async function unary<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (error) {
    throw workspaceError(error);
  }
}

/** A server stream whose failure is rethrown as a WorkspaceError; leaving the loop early cancels the call. */
export async function* streamed<T>(responses: AsyncIterable<T>): AsyncGenerator<T, void, undefined> {
  try {
    yield* responses;
  } catch (error) {
    throw workspaceError(error);
  }
}
