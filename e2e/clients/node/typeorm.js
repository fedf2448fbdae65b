// TypeORM client of the rlsproxy end-to-end tests (e2e/node_orm_test.go):
// a DataSource with synchronize, an entity with a generated uuid key, and
// repositories, in plain JavaScript (EntitySchema rather than decorators).
//
// With a uuid column, TypeORM sends CREATE EXTENSION IF NOT EXISTS
// "uuid-ossp" when it connects. It logs a refusal of that as a warning and
// goes on, so the client records warnings and failed queries and prints
// them: a refusal must show.
'use strict';

const { DataSource, EntitySchema, Raw } = require('typeorm');
const { config, CURRENT_USER, SUB, out, notes, main } = require('./common');

const Item = new EntitySchema({
  name: 'Item',
  tableName: 'item',
  columns: {
    id: { type: 'uuid', primary: true, generated: 'uuid' },
    title: { type: 'text' },
    // The claim the proxy installed, read by the database as the row is
    // written.
    owner: { type: 'text', default: () => "current_setting('jwt.claims.sub')" },
  },
});

// Note is the demo table, which TypeORM must leave alone.
const Note = new EntitySchema({
  name: 'Note',
  tableName: 'notes',
  schema: 'public',
  synchronize: false,
  columns: {
    id: { type: 'int', primary: true, generated: 'increment' },
    user_id: { type: 'text' },
    content: { type: 'text' },
  },
});

const problems = [];
const extensions = [];
const logger = {
  logQuery(query) {
    if (/create extension/i.test(query)) {
      extensions.push(query);
    }
  },
  logQueryError(error, query) {
    problems.push(`${query}: ${error && error.message ? error.message : error}`);
  },
  logQuerySlow() {},
  logSchemaBuild() {},
  logMigration() {},
  log(level, message) {
    if (level === 'warn') {
      problems.push(String(message));
    }
  },
};

main(async () => {
  const ds = new DataSource({
    type: 'postgres',
    host: config.host,
    port: config.port,
    username: config.user,
    password: config.password,
    database: config.database,
    schema: 'node_typeorm',
    entities: [Item, Note],
    synchronize: true,
    logging: ['query', 'error', 'warn'],
    logger,
    extra: { max: 2 },
  });
  await ds.initialize();
  try {
    out('current_user', (await ds.query(CURRENT_USER))[0].u);
    out('sub', (await ds.query(SUB))[0].s);
    // Once more, now that the table exists: nothing to change.
    await ds.synchronize();
    out('create_extension', extensions.join(';'));

    const items = ds.getRepository('Item');
    const saved = await items.save({ title: 'typeorm item' });
    out('item_owner', saved.owner);
    out('item_id', /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-/.test(saved.id) ? 'uuid v4' : saved.id);
    const own = await items.find({
      where: { owner: Raw((col) => `${col} = current_setting('jwt.claims.sub')`) },
      order: { title: 'ASC' },
    });
    out('own_items', own.map((i) => i.title).join(';'));

    out('notes', notes(await ds.getRepository('Note').find({ order: { id: 'ASC' } })));
    out('notes_query_builder', notes(await ds.getRepository('Note')
      .createQueryBuilder('n')
      .where('n.id >= :min', { min: 1 })
      .orderBy('n.id')
      .getMany()));
    out('problems', problems.join(' | ') || 'none');
  } finally {
    await ds.destroy();
  }
});
