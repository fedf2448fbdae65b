// Shared by the ORM clients of the rlsproxy end-to-end tests
// (e2e/node_orm_test.go): the connection settings, read from the PG*
// environment variables as the other clients do (PGPASSWORD is the token),
// and the "check<TAB>value" output the Go test compares.
'use strict';

const config = {
  host: process.env.PGHOST,
  port: Number(process.env.PGPORT),
  database: process.env.PGDATABASE,
  user: process.env.PGUSER,
  password: process.env.PGPASSWORD,
  // The proxy under test has no TLS.
  ssl: false,
};

// The identity every client must see, asked the same way in each, so that
// the Go test compares one set of values.
const CURRENT_USER = 'SELECT current_user AS u';
const SUB = "SELECT current_setting('jwt.claims.sub') AS s";
const NOTES = 'SELECT user_id, content FROM public.notes ORDER BY id';

function out(check, value) {
  process.stdout.write(`${check}\t${value}\n`);
}

// notes prints rows as "user_id,content;user_id,content".
function notes(rows) {
  return rows.map((r) => `${r.user_id},${r.content}`).join(';');
}

// refused prints what the database (or the proxy, speaking as it) answered
// to a statement that failed: "refused SQLSTATE: message". Drivers and ORMs
// wrap the server's error differently; each keeps the original somewhere.
function refused(e) {
  const orig = e.original || e.parent || e.driverError || e.cause || e;
  const code = orig.code || e.code || '';
  return `refused ${code}: ${String(orig.message || e.message).replace(/\s+/g, ' ')}`;
}

// main runs the client and exits non-zero on anything unexpected: the Go
// test then shows stderr.
function main(fn) {
  fn().then(
    () => process.exit(0),
    (e) => {
      console.error(e);
      process.exit(1);
    },
  );
}

module.exports = { config, CURRENT_USER, SUB, NOTES, out, notes, refused, main };
