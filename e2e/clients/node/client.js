// node-postgres client of the rlsproxy end-to-end tests (e2e/clients_test.go).
//
// Connects with the PG* environment variables (PGPASSWORD is the token) and
// prints one "check<TAB>value" line per result; rows print as
// "user_id,content;user_id,content". A refused connection prints
// "connect_error<TAB>SQLSTATE<TAB>message" and exits 3.
'use strict';

const { Client, Pool } = require('pg');

const NOTES = 'SELECT user_id, content FROM notes WHERE id >= $1 ORDER BY id';

function out(check, value) {
  process.stdout.write(`${check}\t${value}\n`);
}

function rows(result) {
  return result.rows.map((r) => `${r.user_id},${r.content}`).join(';');
}

const config = {
  host: process.env.PGHOST,
  port: Number(process.env.PGPORT),
  database: process.env.PGDATABASE,
  user: process.env.PGUSER,
  password: process.env.PGPASSWORD,
  // The proxy under test has no TLS; node-postgres has no sslmode=prefer.
  ssl: false,
  application_name: 'rlsproxy-e2e-node',
  connectionTimeoutMillis: 10000,
};

async function main() {
  const client = new Client(config);
  try {
    await client.connect();
  } catch (e) {
    out('connect_error', `${e.code || ''}\t${String(e.message).replace(/\n/g, ' ')}`);
    process.exit(3);
  }
  try {
    out('current_user', (await client.query('SELECT current_user AS u')).rows[0].u);
    out('sub', (await client.query("SELECT current_setting('jwt.claims.sub') AS s")).rows[0].s);
    // Without values node-postgres sends a simple Query.
    out('plain', rows(await client.query('SELECT user_id, content FROM notes ORDER BY id')));
    // With values it uses the extended protocol on the unnamed statement.
    out('params', rows(await client.query(NOTES, [1])));
    // A named query is parsed once per connection and only bound after.
    for (let i = 0; i < 6; i++) {
      out('named', rows(await client.query({ name: 'notes', text: NOTES, values: [1] })));
    }
    out('server_prepared',
      (await client.query('SELECT (count(*) > 0)::text AS p FROM pg_prepared_statements')).rows[0].p);
    // The policy's WITH CHECK refuses a row owned by someone else.
    await client.query('BEGIN');
    try {
      await client.query("INSERT INTO notes (user_id, content) VALUES ('someone-else', 'forged')");
      out('insert_denied', 'none');
    } catch (e) {
      out('insert_denied', e.code);
    }
    await client.query('ROLLBACK');
  } finally {
    await client.end();
  }

  // A pool running queries at once opens several sessions with the same
  // token, as a web server would.
  const pool = new Pool({ ...config, max: 3 });
  try {
    const results = await Promise.all([1, 2, 3].map(() => pool.query(NOTES, [1])));
    for (const r of results) {
      out('pool', rows(r));
    }
    out('pool_sessions', String(pool.totalCount));
  } finally {
    await pool.end();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
