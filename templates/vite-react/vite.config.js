// The orchestrator sets PORT (4321 inside a container); listen on every interface so the published port reaches it.
import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

export default defineConfig({
  plugins: [react()],
  server: {
    host: "0.0.0.0",
    port: Number(process.env.PORT) || 4321,
    strictPort: true,
  },
});
