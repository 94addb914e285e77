// The orchestrator sets PORT (4321 inside a container); listen on every interface so the published port reaches it.
import { defineConfig } from "astro/config";

export default defineConfig({
  server: {
    host: "0.0.0.0",
    port: Number(process.env.PORT) || 4321,
  },
});
