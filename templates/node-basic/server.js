// A dependency-free dev server: serves the files under src/, read on every request so an edit shows at once.
// `npm run dev` restarts it (node --watch) when this file changes; an edit under src/ needs no restart (one
// would refuse requests while the server starts again).
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";

const port = Number(process.env.PORT) || 4321;
const root = join(import.meta.dirname, "src");
const types = {
  ".html": "text/html; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".json": "application/json",
  ".svg": "image/svg+xml",
  ".txt": "text/plain; charset=utf-8",
};

const server = createServer(async (request, response) => {
  try {
    const { pathname } = new URL(request.url, "http://localhost");
    // normalize() of an absolute path drops every "..", so the file stays under src/.
    const file = normalize(decodeURIComponent(pathname === "/" ? "/index.html" : pathname));
    const body = await readFile(join(root, file));
    response.writeHead(200, {
      "content-type": types[extname(file)] ?? "application/octet-stream",
      "cache-control": "no-store",
    });
    response.end(body);
  } catch (error) {
    const status = error instanceof URIError ? 400 : error.code === "ENOENT" || error.code === "EISDIR" ? 404 : 500;
    response.writeHead(status, { "content-type": "text/plain" }).end(`${status}\n`);
  }
});

server.listen(port, "0.0.0.0", () => {
  console.log(`node-basic listening on http://0.0.0.0:${port}/`);
});
