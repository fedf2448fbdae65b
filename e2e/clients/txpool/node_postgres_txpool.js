// node-postgres client of the transaction-pooling e2e test
// (e2e/txpool_clients_test.go). Its packages are e2e/clients/node's, found
// through NODE_PATH.
//
// TXPOOL_CONNS Clients run TXPOOL_TXS transactions each, concurrently, that
// re-execute the same named queries ({ name, text, values }: Parse once per
// connection, Bind after). Every tenth transaction deallocates "who" (SQL
// DEALLOCATE) and prepares it again under the same name. Prints one line per
// transaction: "tx<TAB>conn<TAB>i<TAB>kind<TAB>who<TAB>rows<TAB>pids" (see the
// Go test). Connects with the PG* environment variables (PGPASSWORD is the
// token).
'use strict';

const { Client } = require('pg');
const { config, tx, runClients } = require('./txpool_common');

const WHO = "SELECT current_user::text AS u, current_setting('jwt.claims.sub') AS s, $1::int * 2 AS d, pg_backend_pid() AS pid";
const NOTES = 'SELECT user_id, content FROM notes WHERE id >= $1 ORDER BY id';

function kind(i) {
  if (i % 10 === 9) {
    return 'redo';
  }
  return i % 3 === 2 ? 'block' : 'auto';
}

async function client(c, txs) {
  const client = new Client({
    ...config,
    application_name: 'rlsproxy-e2e-txpool-node-postgres',
    connectionTimeoutMillis: 10000,
  });
  await client.connect();
  try {
    const who = async (i) => {
      const r = (await client.query({ name: 'who', text: WHO, values: [i] })).rows[0];
      return [`${r.u},${r.s},${r.d}`, r.pid];
    };
    const notes = async () => (await client.query({ name: 'notes', text: NOTES, values: [1] })).rows
      .map((r) => `${r.user_id},${r.content}`).join(';');
    for (let i = 0; i < txs; i++) {
      const k = kind(i);
      let w;
      let rows;
      const pids = [];
      if (k === 'block') {
        await client.query('BEGIN');
        const [w1, pid1] = await who(i);
        rows = await notes();
        const [w2, pid2] = await who(i);
        await client.query('COMMIT');
        w = w2 === w1 ? w1 : `${w1}|${w2}`;
        pids.push(pid1, pid2);
      } else {
        if (k === 'redo') {
          // DEALLOCATE who, then make node-postgres forget it parsed it
          // (its own record of the connection's statements), so that the
          // next named query parses "who" again.
          await client.query('DEALLOCATE who');
          delete client.connection.parsedStatements.who;
        }
        const [w1, pid1] = await who(i);
        w = w1;
        rows = await notes();
        pids.push(pid1);
      }
      tx(c, i, k, w, rows, pids);
    }
  } finally {
    await client.end();
  }
}

runClients(client);
