// Drizzle client of the rlsproxy end-to-end tests (e2e/node_orm_test.go):
// drizzle-orm's node-postgres migrator over the migrations in ./drizzle
// (drizzle-kit's layout: SQL files and meta/_journal.json), twice, then
// queries through drizzle.
//
// The migrator sends CREATE SCHEMA IF NOT EXISTS for its own table, which
// needs CREATE on the database even when the schema exists: the test grants
// it to role authenticated.
'use strict';

const path = require('node:path');
const { Pool } = require('pg');
const { drizzle } = require('drizzle-orm/node-postgres');
const { migrate } = require('drizzle-orm/node-postgres/migrator');
const { pgSchema, pgTable, serial, text, boolean } = require('drizzle-orm/pg-core');
const { and, asc, eq, gte, sql } = require('drizzle-orm');
const { config, CURRENT_USER, SUB, out, notes, main } = require('./common');

const MIGRATIONS = { migrationsFolder: path.join(__dirname, 'drizzle'), migrationsSchema: 'node_drizzle' };

const todo = pgSchema('node_drizzle_app').table('todo', {
  id: serial('id').primaryKey(),
  title: text('title').notNull(),
  owner: text('owner').notNull().default(sql`current_setting('jwt.claims.sub')`),
  done: boolean('done').notNull().default(false),
});

const notesTable = pgTable('notes', {
  id: serial('id').primaryKey(),
  user_id: text('user_id').notNull(),
  content: text('content').notNull(),
});

main(async () => {
  const pool = new Pool({ ...config, max: 2 });
  const db = drizzle(pool);
  try {
    out('current_user', (await db.execute(sql.raw(CURRENT_USER))).rows[0].u);
    out('sub', (await db.execute(sql.raw(SUB))).rows[0].s);

    for (const check of ['migrate', 'migrate_again']) {
      await migrate(db, MIGRATIONS);
      const { rows } = await db.execute(sql`select count(*)::int as n from node_drizzle.__drizzle_migrations`);
      out(check, `${rows[0].n} recorded`);
    }
    const { rows: cols } = await db.execute(sql`select string_agg(column_name, ',' order by ordinal_position) as c
      from information_schema.columns where table_schema = 'node_drizzle_app' and table_name = 'todo'`);
    out('todo_columns', cols[0].c);

    const [row] = await db.insert(todo).values({ title: 'drizzle todo' }).returning({ owner: todo.owner });
    out('todo_owner', row.owner);
    const own = await db
      .select({ title: todo.title })
      .from(todo)
      .where(and(eq(todo.owner, sql`current_setting('jwt.claims.sub')`), eq(todo.done, false)));
    out('own_todos', own.map((r) => r.title).join(';'));

    out('notes', notes(await db.select().from(notesTable).where(gte(notesTable.id, 1)).orderBy(asc(notesTable.id))));
  } finally {
    await pool.end();
  }
});
