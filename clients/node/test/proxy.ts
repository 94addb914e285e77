// A TCP proxy the test controls: it forwards to a target until `drop()` cuts every connection it holds,
// as a network failure would; new connections are accepted again right after.

import net from 'node:net';

export class Proxy {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  drops = 0;

  private constructor(server: net.Server) {
    this.server = server;
  }

  static async start(target: string): Promise<Proxy> {
    const [host, port] = splitAddress(target);
    const server = net.createServer();
    const proxy = new Proxy(server);
    server.on('connection', (client) => {
      const upstream = net.connect(port, host);
      for (const socket of [client, upstream]) {
        proxy.sockets.add(socket);
        socket.on('error', () => {}); // a cut connection errors on both sides; that is the point
        socket.on('close', () => proxy.sockets.delete(socket));
      }
      client.pipe(upstream).pipe(client);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  get address(): string {
    const { port } = this.server.address() as net.AddressInfo;
    return `127.0.0.1:${port}`;
  }

  /** Cuts every open connection at once, both ways. */
  drop(): void {
    this.drops += 1;
    for (const socket of this.sockets) socket.destroy();
  }

  async close(): Promise<void> {
    this.drop();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function splitAddress(address: string): [string, number] {
  const colon = address.lastIndexOf(':');
  return [address.slice(0, colon), Number(address.slice(colon + 1))];
}
