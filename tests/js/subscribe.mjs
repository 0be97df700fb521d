// Follows one subscription with a real client library and prints one JSON line per result,
// then {"complete": true} or {"error": {...}}.
// Usage: node subscribe.mjs apollo|sse URL TOKEN QUERY VARIABLES_JSON
// apollo: @apollo/client with only an HttpLink (multipart subscriptions over HTTP);
// sse: the graphql-sse client in distinct-connections mode.
import { ApolloClient, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { createClient } from 'graphql-sse';

const [client, url, token, query, variablesJson] = process.argv.slice(2);
const variables = JSON.parse(variablesJson || '{}');
const headers = token ? { authorization: `Bearer ${token}` } : {};
const print = (value) => process.stdout.write(JSON.stringify(value) + '\n');
const describe = (error) => ({
  name: error?.name,
  message: error?.message,
  errors: error?.errors,
});

if (client === 'apollo') {
  const apollo = new ApolloClient({
    link: new HttpLink({ uri: url, headers }),
    cache: new InMemoryCache(),
  });
  await new Promise((resolve) => {
    apollo.subscribe({ query: gql(query), variables, fetchPolicy: 'no-cache' }).subscribe({
      next(result) {
        if (result.error) print({ error: describe(result.error) });
        else print({ data: result.data });
      },
      error(error) {
        print({ error: describe(error) });
        resolve();
      },
      complete() {
        print({ complete: true });
        resolve();
      },
    });
  });
} else if (client === 'sse') {
  const sse = createClient({ url, headers, singleConnection: false, retryAttempts: 0 });
  try {
    for await (const result of sse.iterate({ query, variables })) print(result);
    print({ complete: true });
  } catch (error) {
    print({ error: describe(error) });
  }
  sse.dispose();
} else {
  console.error('usage: node subscribe.mjs apollo|sse URL TOKEN QUERY VARIABLES_JSON');
  process.exit(2);
}
