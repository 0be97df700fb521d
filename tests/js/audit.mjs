// Runs graphql-http's GraphQL-over-HTTP audit suite against a live server and prints one
// JSON document: {"results": [{id, name, status, reason}]}. Usage: node audit.mjs URL
import { auditServer } from 'graphql-http';

const url = process.argv[2];
if (!url) {
  console.error('usage: node audit.mjs http://host:port/graphql');
  process.exit(2);
}
const results = await auditServer({ url });
const out = [];
for (const result of results) {
  const entry = { id: result.id, name: result.name, status: result.status };
  if (result.status !== 'ok') {
    entry.reason = result.reason;
    entry.responseStatus = result.response.status;
    entry.responseType = result.response.headers.get('content-type');
  }
  out.push(entry);
}
process.stdout.write(JSON.stringify({ results: out }, null, 1) + '\n');
