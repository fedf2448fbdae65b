-- The demo schema of the seed article: notes that each user sees alone.
-- :'password' is replaced by Setup before this runs.
CREATE ROLE authenticated NOLOGIN;
CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD :'password';
GRANT authenticated TO authenticator;

CREATE TABLE notes (
    id      serial PRIMARY KEY,
    user_id text NOT NULL DEFAULT current_setting('jwt.claims.sub'),
    content text NOT NULL
);
ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
-- current_setting without missing_ok fails when no claims are set: closed.
CREATE POLICY notes_owner ON notes
    USING (user_id = current_setting('jwt.claims.sub'))
    WITH CHECK (user_id = current_setting('jwt.claims.sub'));
GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO authenticated;
GRANT USAGE ON SEQUENCE notes_id_seq TO authenticated;

INSERT INTO notes (user_id, content) VALUES
    ('user1', 'user1: buy milk'),
    ('user1', 'user1: call the bank'),
    ('user2', 'user2: water the plants');
