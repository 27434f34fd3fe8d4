// Type-checked by `npm run typecheck` (tsc --noEmit): how an app in
// TypeScript uses ringcast-client. Not run.
import { Ringcast, RingcastError, type Subscription, type MessageMeta } from "ringcast-client";

interface Notification {
  title: string;
  body?: string;
}

async function fetchToken(): Promise<string> {
  const res = await fetch("/api/ringcast-token", { credentials: "include" });
  return (await res.json()).token as string;
}

export function start(url: string): Ringcast {
  const rc = new Ringcast(url, { getToken: fetchToken, maxQueuedPublishes: 50 });
  rc.on("connected", ({ conn, node, heartbeat }) => console.log(`connected ${conn} to ${node}, heartbeat ${heartbeat}s`));
  rc.on("disconnected", ({ code, reason, delay }) => console.log(`lost (${code} ${reason}), again in ${delay} ms`));
  rc.on("closed", ({ code, reason }) => console.log(`stopped: ${code} ${reason}`));
  rc.on("error", (e) => console.warn(e instanceof RingcastError ? `${e.code}: ${e.message}` : e));

  const saved = localStorage.getItem("pos:user.42");
  const position = saved ? (JSON.parse(saved) as { since?: string; epoch?: string }) : {};
  const sub: Subscription<Notification> = rc.subscribe<Notification>(
    "user.42",
    (n: Notification, meta: MessageMeta) => {
      console.log(n.title, meta.id, meta.event ?? "");
      localStorage.setItem("pos:user.42", JSON.stringify(sub.position));
    },
    position,
  );
  sub.on("unrecovered", ({ epoch, last }) => console.log(`missed messages (epoch ${epoch}, at ${last}): refetch`));
  sub.on("error", (e) => console.warn(`user.42: ${e.code} ${e.message}, retry: ${e.willRetry === true}`));
  return rc;
}

export async function send(rc: Ringcast): Promise<string | undefined> {
  try {
    const mid: string = await rc.publish("chat:42", { text: "hello" });
    return mid;
  } catch (e) {
    if (e instanceof RingcastError && e.code === "outcome_unknown") return undefined; // maybe delivered
    throw e;
  }
}

export async function who(rc: Ringcast): Promise<number> {
  const { users, count, truncated } = await rc.presence("chat:42");
  return truncated ? count : users.length;
}
