// The graphql-ws reference server (graphql-js + ws + graphql-ws) serving the same
// `sessionProgress` shape as Mora, for side-by-side benchmarks (bench/fanout.py, bench/idle.py).
//
//   node bench/peers/graphql-ws-server.mjs [--port 0]
//
// Prints its base URL (http://127.0.0.1:PORT) on the first line of stdout, then serves:
//   WS   /graphql   graphql-transport-ws, `subscription { sessionProgress(sessionId, afterSeq) }`
//   POST /start     {"sessionId", "rate", "count"}: emit `count` CodeDelta events at `rate`/s on
//                   that session, then SessionCompleted. Each CodeDelta's text is
//                   "t_<n> = <CLOCK_MONOTONIC ns>\n", stamped when the event is published.
//   POST /emit      {"sessionId", "text"?, "final"?}: publish one CodeDelta now (text stamped as
//                   above when absent), or SessionCompleted when final is true.
//   GET  /stats     {"subscribers", "published"}
//   GET  /ready     200
//   POST /gc        run a full garbage collection (with `node --expose-gc`), then 200
//
// Like Mora, every subscription gets a SessionSnapshot first, then every later event; it
// completes after the terminal event. Each event is executed once per subscriber: that is
// what graphql-ws does with graphql-js's `subscribe`.
import http from "node:http";
import { buildSchema } from "graphql";
import { WebSocketServer } from "ws";
import { useServer } from "graphql-ws/use/ws";

const SDL = /* GraphQL */ `
  enum SessionStatus { CREATED PROCESSING COMPLETED ERROR CANCELLED }
  enum PipelineStage { FETCHING_SUBTITLES GENERATING_CODE BUILDING_TIMELINE }
  type Session { id: ID! status: SessionStatus! progress: Float! lastSeq: Int! generatedCode: String }
  interface SessionEvent {
    seq: Int! sessionId: ID! at: String! status: SessionStatus! stage: PipelineStage progress: Float!
  }
  type SessionSnapshot implements SessionEvent {
    seq: Int! sessionId: ID! at: String! status: SessionStatus! stage: PipelineStage progress: Float!
    session: Session!
  }
  type StatusChanged implements SessionEvent {
    seq: Int! sessionId: ID! at: String! status: SessionStatus! stage: PipelineStage progress: Float!
  }
  type CodeDelta implements SessionEvent {
    seq: Int! sessionId: ID! at: String! status: SessionStatus! stage: PipelineStage progress: Float!
    text: String!
  }
  type CodeReset implements SessionEvent {
    seq: Int! sessionId: ID! at: String! status: SessionStatus! stage: PipelineStage progress: Float!
  }
  type SessionCompleted implements SessionEvent {
    seq: Int! sessionId: ID! at: String! status: SessionStatus! stage: PipelineStage progress: Float!
    session: Session!
  }
  type Query { ready: Boolean! }
  type Subscription { sessionProgress(sessionId: ID!, afterSeq: Int): SessionEvent! }
`;

const schema = buildSchema(SDL);

/** sessionId -> {seq, code, done, subscribers: Set<(event) => void>} */
const sessions = new Map();
let published = 0;
let subscribers = 0;

function session(id) {
  let s = sessions.get(id);
  if (!s) {
    s = { id, seq: 0, code: "", done: false, subscribers: new Set() };
    sessions.set(id, s);
  }
  return s;
}

function sessionObject(s) {
  return {
    id: s.id,
    status: s.done ? "COMPLETED" : "PROCESSING",
    progress: s.done ? 1 : 0.5,
    lastSeq: s.seq,
    generatedCode: s.code,
  };
}

function base(s, typename) {
  return {
    __typename: typename,
    seq: s.seq,
    sessionId: s.id,
    at: new Date().toISOString(),
    status: s.done ? "COMPLETED" : "PROCESSING",
    stage: s.done ? null : "GENERATING_CODE",
    progress: s.done ? 1 : 0.5,
  };
}

function publish(s, event) {
  published += 1;
  for (const push of s.subscribers) push(event);
}

function emitDelta(s, text) {
  s.seq += 1;
  const body = text ?? `t_${s.seq} = ${process.hrtime.bigint()}\n`;
  s.code += body;
  publish(s, { ...base(s, "CodeDelta"), text: body });
}

function emitCompleted(s) {
  s.seq += 1;
  s.done = true;
  publish(s, { ...base(s, "SessionCompleted"), session: sessionObject(s) });
}

/** An async iterator over one subscriber's events: snapshot, then live until terminal. */
function follow(sessionId) {
  const s = session(sessionId);
  const queue = [{ ...base(s, "SessionSnapshot"), session: sessionObject(s) }];
  let wake = null;
  let finished = s.done;
  const push = (event) => {
    queue.push(event);
    if (wake) {
      const w = wake;
      wake = null;
      w();
    }
  };
  if (!finished) {
    s.subscribers.add(push);
    subscribers += 1;
  }
  const stop = () => {
    if (s.subscribers.delete(push)) subscribers -= 1;
  };
  return {
    [Symbol.asyncIterator]() {
      return this;
    },
    async next() {
      for (;;) {
        if (queue.length) {
          const event = queue.shift();
          if (event.__typename === "SessionCompleted") {
            finished = true;
            stop();
          }
          return { value: { sessionProgress: event }, done: false };
        }
        if (finished) return { value: undefined, done: true };
        await new Promise((resolve) => {
          wake = resolve;
        });
      }
    },
    async return() {
      finished = true;
      stop();
      return { value: undefined, done: true };
    },
    async throw(error) {
      stop();
      throw error;
    },
  };
}

const roots = {
  ready: () => true,
  sessionProgress: ({ sessionId }) => follow(sessionId),
};

function start(s, rate, count) {
  const interval = 1e9 / rate;
  const t0 = process.hrtime.bigint();
  let n = 0;
  const tick = () => {
    const due = Number(process.hrtime.bigint() - t0) / interval;
    while (n < count && n <= due) {
      emitDelta(s);
      n += 1;
    }
    if (n >= count) {
      emitCompleted(s);
      return;
    }
    const wait = ((n * interval) - Number(process.hrtime.bigint() - t0)) / 1e6;
    setTimeout(tick, Math.max(0, wait));
  };
  tick();
}

function readJson(req) {
  return new Promise((resolve, reject) => {
    const parts = [];
    req.on("data", (part) => parts.push(part));
    req.on("end", () => {
      try {
        resolve(parts.length ? JSON.parse(Buffer.concat(parts).toString()) : {});
      } catch (error) {
        reject(error);
      }
    });
  });
}

const server = http.createServer(async (req, res) => {
  const reply = (status, body) => {
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(body));
  };
  try {
    if (req.method === "GET" && req.url === "/ready") return reply(200, { ok: true });
    if (req.method === "GET" && req.url === "/stats") {
      return reply(200, { subscribers, published, rss: process.memoryUsage().rss });
    }
    if (req.method === "POST" && req.url === "/gc") {
      if (globalThis.gc) globalThis.gc();
      return reply(200, { gc: Boolean(globalThis.gc), rss: process.memoryUsage().rss });
    }
    if (req.method === "POST" && req.url === "/start") {
      const body = await readJson(req);
      start(session(String(body.sessionId)), Number(body.rate), Number(body.count));
      return reply(202, { ok: true });
    }
    if (req.method === "POST" && req.url === "/emit") {
      const body = await readJson(req);
      const s = session(String(body.sessionId));
      if (body.final) emitCompleted(s);
      else emitDelta(s, body.text);
      return reply(200, { seq: s.seq });
    }
    return reply(404, { error: "not found" });
  } catch (error) {
    return reply(400, { error: String(error) });
  }
});

const wss = new WebSocketServer({ server, path: "/graphql" });
useServer({ schema, roots: { query: roots, subscription: roots } }, wss);

const portArg = process.argv.indexOf("--port");
const port = portArg > 0 ? Number(process.argv[portArg + 1]) : 0;
server.listen(port, "127.0.0.1", () => {
  process.stdout.write(`http://127.0.0.1:${server.address().port}\n`);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
