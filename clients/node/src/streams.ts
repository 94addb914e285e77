// Plumbing between Node streams and gRPC streams: a queue of requests the caller pushes into (Exec's stdin,
// signals), archive bytes cut to message-sized chunks, and a download as a Readable with its metadata.

import { Readable } from 'node:stream';

/** An async iterable fed by `push` and finished by `end`: the request side of a bidi call. */
export class RequestQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private waiting: (() => void) | null = null;
  private ended = false;

  push(item: T): void {
    if (this.ended) throw new Error('the call has ended: nothing more can be sent');
    this.items.push(item);
    this.wake();
  }

  end(): void {
    this.ended = true;
    this.wake();
  }

  get isEnded(): boolean {
    return this.ended;
  }

  private wake(): void {
    const waiting = this.waiting;
    this.waiting = null;
    waiting?.();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<T, void, undefined> {
    for (;;) {
      const item = this.items.shift();
      if (item !== undefined) yield item;
      else if (this.ended) return;
      else await new Promise<void>((resolve) => (this.waiting = resolve));
    }
  }
}

/** What an upload reads from: a Node Readable, or any (async) iterable of bytes (or strings, as UTF-8). */
export type ByteSource = AsyncIterable<Uint8Array | string> | Iterable<Uint8Array | string>;

// The agent and the orchestrator accept messages of up to 4 MiB; smaller chunks keep memory flat.
const UPLOAD_CHUNK_BYTES = 256 * 1024;

/** The bytes of `source` in chunks of at most 256 KiB. */
export async function* chunks(source: ByteSource): AsyncGenerator<Uint8Array, void, undefined> {
  for await (const piece of source) {
    const bytes = typeof piece === 'string' ? Buffer.from(piece) : piece;
    for (let start = 0; start < bytes.length; start += UPLOAD_CHUNK_BYTES) {
      yield bytes.subarray(start, start + UPLOAD_CHUNK_BYTES);
    }
  }
}

/** A download: a Readable of the bytes, and `meta`, the stream's metadata (the template archive's info, first;
 * the workspace archive's summary, last), which rejects when the download fails or is destroyed first. */
export type Download<Meta> = Readable & { readonly meta: Promise<Meta> };

/** A Readable over a server stream's `chunk` events; the call starts when the Readable is first read and is
 * cancelled when it is destroyed. */
export function download<R, Meta>(
  responses: () => AsyncIterable<R>,
  pick: (response: R) => { chunk: Uint8Array } | { meta: Meta } | undefined,
): Download<Meta> {
  let settle: { resolve: (meta: Meta) => void; reject: (error: unknown) => void };
  const meta = new Promise<Meta>((resolve, reject) => (settle = { resolve, reject }));
  meta.catch(() => {}); // a caller that only reads the bytes sees the error on the stream
  let found = false;
  async function* bytes(): AsyncGenerator<Buffer, void, undefined> {
    try {
      for await (const response of responses()) {
        const part = pick(response);
        if (part === undefined) continue;
        if ('chunk' in part) yield Buffer.from(part.chunk.buffer, part.chunk.byteOffset, part.chunk.byteLength);
        else {
          found = true;
          settle.resolve(part.meta);
        }
      }
      if (!found) throw new Error('the stream ended without its metadata');
    } catch (error) {
      settle.reject(error);
      throw error;
    } finally {
      settle.reject(new Error('the download was closed before its metadata arrived'));
    }
  }
  return Object.assign(Readable.from(bytes(), { objectMode: false }), { meta });
}
