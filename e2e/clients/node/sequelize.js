// Sequelize client of the rlsproxy end-to-end tests (e2e/node_orm_test.go).
//
// Two of Sequelize's ordinary calls send code the guard cannot see into:
// findOrCreate inserts through a temporary plpgsql function
//   CREATE OR REPLACE FUNCTION pg_temp.testfunc(...) ... LANGUAGE plpgsql;
//   SELECT ... FROM pg_temp.testfunc(); DROP FUNCTION IF EXISTS pg_temp.testfunc()
// inside a transaction, and sync() of a model with an ENUM column creates
// the type in a DO block when it does not exist yet. A proxy with the guard
// refuses both unless started with --guard-allow-code: the client prints
// what each call got, so the test sees the refusal or the result.
'use strict';

const { Sequelize, DataTypes, QueryTypes } = require('sequelize');
const { config, CURRENT_USER, SUB, out, notes, refused, main } = require('./common');

const SCHEMA = 'node_sequelize';

main(async () => {
  const sequelize = new Sequelize(config.database, config.user, config.password, {
    host: config.host,
    port: config.port,
    dialect: 'postgres',
    logging: false,
    pool: { max: 2 },
  });
  const one = async (q) => (await sequelize.query(q, { type: QueryTypes.SELECT }))[0];
  try {
    out('current_user', (await one(CURRENT_USER)).u);
    out('sub', (await one(SUB)).s);

    const Tag = sequelize.define('Tag', {
      name: { type: DataTypes.TEXT, allowNull: false, unique: true },
      // The claim the proxy installed, read by the database as the row is
      // written (by the temporary function, for findOrCreate).
      owner: { type: DataTypes.TEXT, allowNull: false, defaultValue: sequelize.literal("current_setting('jwt.claims.sub')") },
    }, { schema: SCHEMA, tableName: 'tag', timestamps: false });
    await Tag.sync();
    out('sync_tag', 'ok');

    const name = `tag of ${config.user}`;
    for (const check of ['find_or_create', 'find_or_create_again']) {
      try {
        const [, created] = await Tag.findOrCreate({ where: { name } });
        out(check, created ? 'created' : 'found');
      } catch (e) {
        out(check, refused(e));
      }
    }
    const tag = await Tag.findOne({ where: { name } });
    out('tag_owner', tag ? tag.owner : 'none');

    const Mood = sequelize.define('Mood', {
      feeling: { type: DataTypes.ENUM('happy', 'sad'), allowNull: false },
    }, { schema: SCHEMA, tableName: 'mood', timestamps: false });
    let synced = false;
    try {
      await Mood.sync();
      synced = true;
      out('sync_enum', 'ok');
    } catch (e) {
      out('sync_enum', refused(e));
    }
    if (synced) {
      const mood = await Mood.create({ feeling: 'happy' });
      out('mood', (await Mood.findByPk(mood.id)).feeling);
    } else {
      out('mood', 'none');
    }

    // The session goes on after refusals, with the same identity.
    const Note = sequelize.define('Note', {
      user_id: DataTypes.TEXT,
      content: DataTypes.TEXT,
    }, { schema: 'public', tableName: 'notes', timestamps: false });
    out('notes', notes(await Note.findAll({ order: [['id', 'ASC']], raw: true })));
    out('current_user_after', (await one(CURRENT_USER)).u);
  } finally {
    await sequelize.close();
  }
});
