// One HTTP/2 connection per address, speaking gRPC through Connect's Node transport; `close` ends it.

import type { Interceptor, Transport } from '@connectrpc/connect';
import { Http2SessionManager, createGrpcTransport } from '@connectrpc/connect-node';

/** Per-call options: `signal` cancels the call (it rejects with CancelledError), `timeoutMs` is its gRPC
 * deadline (DeadlineExceededError). */
export interface CallOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface Connection {
  transport: Transport;
  close(): void;
}

/** A plaintext gRPC connection to `address` (`host:port`, or a URL such as `https://host:443`). */
export function connect(address: string, interceptors: Interceptor[] = []): Connection {
  const baseUrl = address.includes('://') ? address : `http://${address}`;
  const sessionManager = new Http2SessionManager(baseUrl);
  return {
    transport: createGrpcTransport({ baseUrl, sessionManager, interceptors }),
    close: () => sessionManager.abort(),
  };
}

/** Sends `authorization: Bearer <token>` with every call (the agent requires it). */
export function bearer(token: string): Interceptor {
  return (next) => (request) => {
    request.header.set('authorization', `Bearer ${token}`);
    return next(request);
  };
}
