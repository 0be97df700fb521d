// Bundles GraphiQL, its Monaco workers, the explorer plugin and graphql-ws into
// mora_graphql/static/graphiql/ and writes manifest.json (versions and SHA-256 of every file).
// Run through ../build-graphiql, which installs the pinned packages with `npm ci` first.
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "..", "mora_graphql", "static", "graphiql");
const common = {
  bundle: true,
  minify: true,
  legalComments: "none",
  logLevel: "warning",
  outdir: out,
  entryNames: "[name]",
  assetNames: "[name]-[hash]",
  define: { "process.env.NODE_ENV": '"production"' },
  target: ["es2022"],
};

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  ...common,
  entryPoints: [join(here, "main.js")],
  format: "esm",
  loader: { ".ttf": "file" },
});
await build({
  ...common,
  entryPoints: [
    "monaco-editor/esm/vs/editor/editor.worker.js",
    "monaco-editor/esm/vs/language/json/json.worker.js",
    "monaco-graphql/esm/graphql.worker.js",
  ].map((path) => join(here, "node_modules", path)),
  format: "iife",
});

const lock = JSON.parse(readFileSync(join(here, "package-lock.json"), "utf8"));
const pinned = JSON.parse(readFileSync(join(here, "package.json"), "utf8")).dependencies;
const packages = {};
for (const name of [...Object.keys(pinned), "monaco-editor", "monaco-graphql"].sort()) {
  const entry = lock.packages[`node_modules/${name}`];
  packages[name] = { version: entry.version, integrity: entry.integrity };
}
const files = {};
for (const name of readdirSync(out).sort()) {
  const data = readFileSync(join(out, name));
  files[name] = { sha256: createHash("sha256").update(data).digest("hex"), bytes: data.length };
}
const manifest = { generator: "scripts/build-graphiql", packages, files };
writeFileSync(join(out, "manifest.json"), `${JSON.stringify(manifest, null, 2)}\n`);
console.log(`GraphiQL assets: ${Object.keys(files).length} files in ${out}`);
