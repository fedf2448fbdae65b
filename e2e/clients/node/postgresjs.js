// postgres.js client of the rlsproxy end-to-end tests (e2e/node_orm_test.go):
// tagged templates (named server-side statements by default), a
// transaction with sql.begin and a savepoint, and sql.unsafe, in both
// protocols.
'use strict';

const postgres = require('postgres');
const { config, CURRENT_USER, SUB, NOTES, out, notes, refused, main } = require('./common');

main(async () => {
  const sql = postgres({
    host: config.host,
    port: config.port,
    database: config.database,
    username: config.user,
    password: config.password,
    ssl: false,
    max: 2,
    connect_timeout: 10,
    onnotice: () => {},
  });
  try {
    out('current_user', (await sql`select current_user as u`)[0].u);
    out('sub', (await sql`select current_setting('jwt.claims.sub') as s`)[0].s);
    // The same tagged template runs three times on its prepared statement.
    for (let i = 0; i < 3; i++) {
      const min = 1;
      out('template', notes(await sql`select user_id, content from public.notes where id >= ${min} order by id`));
    }
    out('server_prepared', (await sql`select (count(*) > 0)::text as p from pg_prepared_statements`)[0].p);

    // A transaction writes a note as the token's user; a savepoint refuses
    // a forged one (the policy's WITH CHECK) and the transaction goes on.
    // Throwing at the end rolls it back, leaving the demo rows as they were.
    const rollback = new Error('rollback');
    try {
      await sql.begin(async (tx) => {
        const [n] = await tx`insert into public.notes (content) values (${'postgres.js note'}) returning user_id`;
        out('tx_insert_owner', n.user_id);
        try {
          await tx.savepoint((sp) => sp`insert into public.notes (user_id, content) values (${'someone-else'}, ${'forged'})`);
          out('tx_forged', 'inserted');
        } catch (e) {
          out('tx_forged', refused(e));
        }
        out('tx_count', (await tx`select count(*)::int as n from public.notes`)[0].n);
        throw rollback;
      });
    } catch (e) {
      if (e !== rollback) {
        throw e;
      }
    }
    out('after_rollback', notes(await sql`select user_id, content from public.notes order by id`));

    // A transaction returning an array of queries sends them pipelined:
    // every message before the first reply.
    const [[who1], rows1] = await sql.begin((tx) => [
      tx`select current_user as u`,
      tx`select user_id, content from public.notes order by id`,
    ]);
    out('pipelined', `${who1.u};${notes(rows1)}`);

    // unsafe with parameters: the extended protocol, unnamed statement.
    out('unsafe_params', notes(await sql.unsafe('SELECT user_id, content FROM public.notes WHERE id >= $1 ORDER BY id', [1])));
    // unsafe with two statements: the simple protocol, two results.
    const [who, rows] = await sql.unsafe(`${CURRENT_USER}; ${NOTES}`).simple();
    out('unsafe_simple', `${who[0].u};${notes(rows)}`);
    out('unsafe_sub', (await sql.unsafe(SUB))[0].s);

    // A cursor fetches one row per Execute on a named portal.
    const batches = [];
    for await (const [row] of sql`select user_id, content from public.notes order by id`.cursor(1)) {
      batches.push(notes([row]));
    }
    out('cursor', batches.join(';'));

    // LISTEN on a connection of its own, NOTIFY through pg_notify.
    let heard;
    const notified = new Promise((resolve) => { heard = resolve; });
    const { unlisten } = await sql.listen(`node_orm_${config.user}`, heard);
    await sql.notify(`node_orm_${config.user}`, `hello ${config.user}`);
    out('notify', await Promise.race([notified, new Promise((resolve) => setTimeout(resolve, 5000, 'timed out'))]));
    await unlisten();
  } finally {
    await sql.end({ timeout: 5 });
  }
});
