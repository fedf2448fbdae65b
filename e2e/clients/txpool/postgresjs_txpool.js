// postgres.js client of the transaction-pooling e2e test
// (e2e/txpool_clients_test.go). Its packages are e2e/clients/node's, found
// through NODE_PATH.
//
// TXPOOL_CONNS instances of one connection each run TXPOOL_TXS transactions
// each, concurrently, re-executing the same tagged templates, which
// postgres.js prepares as named statements (prepare: true, its default) once
// per connection and only binds after. Prints one line per transaction:
// "tx<TAB>conn<TAB>i<TAB>kind<TAB>who<TAB>rows<TAB>pids" (see the Go test).
//
// postgres.js answers "prepared statement does not exist" by preparing the
// query again, silently: a query it had to retry fails here instead, so
// that a statement the proxy lost cannot pass unseen.
'use strict';

const postgres = require('postgres');
const { config, tx, runClients } = require('./txpool_common');

async function client(c, txs) {
  const sql = postgres({
    ...config,
    username: config.user,
    max: 1,
    prepare: true,
    connect_timeout: 10,
    connection: { application_name: 'rlsproxy-e2e-txpool-postgresjs' },
    onnotice: () => {},
  });
  // run awaits a query and fails if postgres.js had to retry it.
  const run = async (q) => {
    const rows = await q;
    if (q.retried) {
      throw new Error(`postgres.js prepared a statement again after: ${q.retried.message}`);
    }
    return rows;
  };
  const who = async (s, i) => {
    const [r] = await run(s`select current_user::text as u, current_setting('jwt.claims.sub') as s, ${i}::int * 2 as d, pg_backend_pid() as pid`);
    return [`${r.u},${r.s},${r.d}`, r.pid];
  };
  const notes = async (s) => (await run(s`select user_id, content from notes where id >= ${1} order by id`))
    .map((r) => `${r.user_id},${r.content}`).join(';');
  try {
    for (let i = 0; i < txs; i++) {
      const k = i % 3 === 2 ? 'block' : 'auto';
      let w;
      let rows;
      const pids = [];
      if (k === 'block') {
        await sql.begin(async (tx) => {
          const [w1, pid1] = await who(tx, i);
          rows = await notes(tx);
          const [w2, pid2] = await who(tx, i);
          w = w2 === w1 ? w1 : `${w1}|${w2}`;
          pids.push(pid1, pid2);
        });
      } else {
        const [w1, pid1] = await who(sql, i);
        w = w1;
        rows = await notes(sql);
        pids.push(pid1);
      }
      tx(c, i, k, w, rows, pids);
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
}

runClients(client);
