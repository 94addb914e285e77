import { useState } from "react";

export default function App() {
  const [count, setCount] = useState(0);
  return (
    <main>
      <h1>Vite + React on workspace-core</h1>
      <button onClick={() => setCount((n) => n + 1)}>count is {count}</button>
      <p>
        Edit <code>src/App.jsx</code>: the change shows up as you save, and the count survives it.
      </p>
    </main>
  );
}
