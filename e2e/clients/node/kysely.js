// Kysely client of the rlsproxy end-to-end tests (e2e/node_orm_test.go):
// its Migrator up, down and up again through the proxy, then queries.
//
// The Migrator takes its lock with
//   with set_timeout as (select set_config('lock_timeout', '3600000', true) ...)
//   select pg_advisory_lock(...) from set_timeout
// a set_config of a setting that carries no identity, inside a CTE.
//
// Tables land in schema node_kysely (the test creates it and lets role
// authenticated create in it) through search_path, sent as a startup
// parameter.
'use strict';

const { Kysely, Migrator, PostgresDialect, sql } = require('kysely');
const { Pool } = require('pg');
const { config, CURRENT_USER, SUB, NOTES, out, notes, main } = require('./common');

const migrations = {
  '0001_todo': {
    async up(db) {
      await db.schema
        .createTable('todo')
        .addColumn('id', 'serial', (c) => c.primaryKey())
        .addColumn('title', 'text', (c) => c.notNull())
        // The claim the proxy installed, read by the database as the row
        // is written.
        .addColumn('owner', 'text', (c) => c.notNull().defaultTo(sql`current_setting('jwt.claims.sub')`))
        .execute();
    },
    async down(db) {
      await db.schema.dropTable('todo').execute();
    },
  },
  '0002_todo_done': {
    async up(db) {
      await db.schema.alterTable('todo').addColumn('done', 'boolean', (c) => c.notNull().defaultTo(false)).execute();
      await db.schema.createIndex('todo_owner').on('todo').column('owner').execute();
    },
    async down(db) {
      await db.schema.dropIndex('todo_owner').execute();
      await db.schema.alterTable('todo').dropColumn('done').execute();
    },
  },
};

// migrated prints the migrations a Migrator call ran, or fails on its error.
function migrated(check, { error, results }) {
  if (error) {
    throw error;
  }
  const ran = (results || []).map((r) => `${r.migrationName}:${r.direction}:${r.status}`);
  out(check, ran.join(',') || 'none');
}

main(async () => {
  const db = new Kysely({
    dialect: new PostgresDialect({
      pool: new Pool({ ...config, max: 2, options: '-c search_path=node_kysely,public' }),
    }),
  });
  try {
    out('current_user', (await sql.raw(CURRENT_USER).execute(db)).rows[0].u);
    out('sub', (await sql.raw(SUB).execute(db)).rows[0].s);

    const migrator = new Migrator({ db, provider: { getMigrations: async () => migrations } });
    migrated('migrate_latest', await migrator.migrateToLatest());
    migrated('migrate_down', await migrator.migrateDown());
    migrated('migrate_latest_again', await migrator.migrateToLatest());
    migrated('migrate_latest_noop', await migrator.migrateToLatest());

    const row = await db.insertInto('todo').values({ title: 'kysely todo' }).returning(['owner', 'done']).executeTakeFirstOrThrow();
    out('todo_owner', row.owner);
    const own = await db
      .selectFrom('todo')
      .select('title')
      .where('owner', '=', sql`current_setting('jwt.claims.sub')`)
      .where('done', '=', false)
      .execute();
    out('own_todos', own.map((r) => r.title).join(';'));

    out('notes', notes((await sql.raw(NOTES).execute(db)).rows));
    // The query builder, with a bind parameter.
    const built = await db
      .selectFrom('public.notes')
      .select(['user_id', 'content'])
      .where('id', '>=', 1)
      .orderBy('id')
      .execute();
    out('notes_builder', notes(built));
  } finally {
    await db.destroy();
  }
});
