// The GraphiQL page of Mora: GraphiQL, the explorer plugin and graphql-ws, bundled at build time.
import { createGraphiQLFetcher } from "@graphiql/toolkit";
import { explorerPlugin } from "@graphiql/plugin-explorer";
import { GraphiQL, HISTORY_PLUGIN } from "graphiql";
import { createClient } from "graphql-ws";
import { createElement } from "react";
import { createRoot } from "react-dom/client";

import "graphiql/style.css";
import "@graphiql/plugin-explorer/style.css";
import "./page.css";

const here = import.meta.url;
const WORKERS = {
  json: "json.worker.js",
  graphql: "graphql.worker.js",
  editor: "editor.worker.js",
};

globalThis.MonacoEnvironment = {
  getWorker(_workerId, label) {
    return new Worker(new URL(WORKERS[label] ?? WORKERS.editor, here));
  },
};

const root = document.getElementById("graphiql");
const url = new URL(root.dataset.endpoint || window.location.pathname, window.location.href);
const wsUrl = new URL(url);
wsUrl.protocol = url.protocol === "https:" ? "wss:" : "ws:";
wsUrl.hash = "";
wsUrl.search = "";

// Subscriptions go over graphql-transport-ws. The server authenticates a socket once, from
// connection_init, so each distinct set of headers gets its own lazy client (it connects on the
// first subscription and closes when the last one ends) carrying the headers as its payload.
let current = null;

function fetcherFor(headers) {
  const key = JSON.stringify(headers);
  if (current === null || current.key !== key) {
    const wsClient = createClient({ url: wsUrl.toString(), lazy: true, connectionParams: headers });
    current = { key, fetcher: createGraphiQLFetcher({ url: url.toString(), wsClient }) };
  }
  return current.fetcher;
}

const fetcher = (params, opts) => fetcherFor((opts && opts.headers) || {})(params, opts);

createRoot(root).render(
  createElement(GraphiQL, {
    fetcher,
    plugins: [HISTORY_PLUGIN, explorerPlugin()],
    defaultEditorToolsVisibility: true,
    isHeadersEditorEnabled: true,
    shouldPersistHeaders: true,
    inputValueDeprecation: true,
  }),
);
