-- The recommended policy, beside the seed's: auth.user_id() (created by
-- `rlsproxy sql --signing-key-file`) verifies the claims' signature, so SQL
-- that slipped past the guard cannot make a session someone else.
CREATE TABLE IF NOT EXISTS todos (
    id      serial PRIMARY KEY,
    user_id text NOT NULL DEFAULT auth.user_id(),
    title   text NOT NULL
);
ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS todos_owner ON todos;
CREATE POLICY todos_owner ON todos
    USING (user_id = (SELECT auth.user_id()))
    WITH CHECK (user_id = (SELECT auth.user_id()));
GRANT SELECT, INSERT, UPDATE, DELETE ON todos TO authenticated;
GRANT USAGE ON SEQUENCE todos_id_seq TO authenticated;

INSERT INTO todos (user_id, title)
    SELECT * FROM (VALUES
        ('user1', 'user1: review the pull request'),
        ('user2', 'user2: book the train')) v
    WHERE NOT EXISTS (SELECT FROM todos);
