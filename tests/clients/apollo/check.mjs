// Apollo Client's own persisted-query link against a Mora server:
//   node check.mjs <graphql url> <access token> <GET|POST>
// Prints one JSON line: the query's data on each attempt and the requests the link sent.
import { createHash } from "node:crypto";
import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";
import { createPersistedQueryLink } from "@apollo/client/link/persisted-queries";

const [url, token, method] = process.argv.slice(2);
const sent = [];
const recordingFetch = async (input, init) => {
  const target = new URL(typeof input === "string" ? input : input.url);
  sent.push({
    method: init?.method ?? "GET",
    hasQuery: Boolean(target.searchParams.get("query") || (init?.body && JSON.parse(init.body).query)),
  });
  return fetch(input, init);
};
const link = createPersistedQueryLink({
  sha256: (text) => createHash("sha256").update(text).digest("hex"),
  useGETForHashedQueries: method === "GET",
}).concat(new HttpLink({ uri: url, fetch: recordingFetch, headers: { authorization: `Bearer ${token}` } }));
const query = gql`query Me { me { email role } }`;
const results = [];
for (let attempt = 0; attempt < 2; attempt++) {
  const client = new ApolloClient({ link, cache: new InMemoryCache() });
  const { data, error } = await client.query({ query, fetchPolicy: "network-only" });
  results.push({ data, error: error ? String(error) : null });
}
console.log(JSON.stringify({ results, sent }));
