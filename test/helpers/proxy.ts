// A byte-forwarding proxy between a test and a server, whose link the test can cut: after
// cut(), bytes in both directions are swallowed and no connection is closed, which is what a
// pulled cable looks like to both ends (no FIN, no RST, just silence).
import { createServer, connect, type Server, type Socket } from 'node:net';

export interface CuttableProxy {
  path: string;
  cut(): void;
  close(): Promise<void>;
}

export async function cuttableProxy(listenPath: string, targetPath: string): Promise<CuttableProxy> {
  let cutOff = false;
  const sockets = new Set<Socket>();
  const server: Server = createServer((down) => {
    const up = connect(targetPath);
    for (const s of [down, up]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => sockets.delete(s));
    }
    down.on('data', (d) => {
      if (!cutOff) up.write(d);
    });
    up.on('data', (d) => {
      if (!cutOff) down.write(d);
    });
    down.on('end', () => !cutOff && up.end());
    up.on('end', () => !cutOff && down.end());
  });
  await new Promise<void>((r) => server.listen(listenPath, r));
  return {
    path: listenPath,
    cut: () => {
      cutOff = true;
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
