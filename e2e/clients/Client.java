// JDBC client of the rlsproxy end-to-end tests (e2e/clients_test.go).
//
// It connects to the proxy with the PG* environment variables (PGPASSWORD is
// the token), runs the demo queries through the paths JDBC takes, and prints
// one "check<TAB>value" line per result; rows print as
// "user_id,content;user_id,content". A refused connection prints
// "connect_error<TAB>SQLSTATE<TAB>message" and exits 3.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class Client {
    static final String NOTES = "SELECT user_id, content FROM notes WHERE id >= ? ORDER BY id";

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/" + env("PGDATABASE");
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER"));
        props.setProperty("password", env("PGPASSWORD"));
        props.setProperty("sslmode", System.getenv().getOrDefault("PGSSLMODE", "disable"));
        props.setProperty("ApplicationName", "rlsproxy-e2e-jdbc");
        props.setProperty("connectTimeout", "10");
        Connection conn;
        try {
            conn = DriverManager.getConnection(url, props);
        } catch (SQLException e) {
            System.out.println("connect_error\t" + e.getSQLState() + "\t" + oneLine(e.getMessage()));
            System.exit(3);
            return;
        }
        try (conn) {
            try (Statement st = conn.createStatement()) {
                print("current_user", scalar(st, "SELECT current_user"));
                print("sub", scalar(st, "SELECT current_setting('jwt.claims.sub')"));
                try (ResultSet rs = st.executeQuery("SELECT user_id, content FROM notes ORDER BY id")) {
                    print("statement", rows(rs));
                }
            }

            // pgjdbc switches a PreparedStatement to a named server-side
            // statement on its prepareThreshold-th (5th) execution: the later
            // runs Bind a statement parsed by an earlier round trip.
            try (PreparedStatement ps = conn.prepareStatement(NOTES)) {
                for (int i = 0; i < 7; i++) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        print("prepared", rows(rs));
                    }
                }
                try (Statement st = conn.createStatement()) {
                    print("server_prepared", scalar(st, "SELECT (count(*) > 0)::text FROM pg_prepared_statements"));
                }
            }

            // A fetch size inside a transaction makes pgjdbc read through a
            // portal a row at a time (Execute with a row limit, PortalSuspended).
            conn.setAutoCommit(false);
            try (PreparedStatement ps = conn.prepareStatement(NOTES)) {
                ps.setFetchSize(1);
                ps.setInt(1, 1);
                try (ResultSet rs = ps.executeQuery()) {
                    print("fetchsize", rows(rs));
                }
            }
            // The policy's WITH CHECK refuses a row owned by someone else.
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("INSERT INTO notes (user_id, content) VALUES ('someone-else', 'forged')");
                print("insert_denied", "none");
            } catch (SQLException e) {
                print("insert_denied", e.getSQLState());
            }
            conn.rollback();
            conn.setAutoCommit(true);

            // setQueryTimeout cancels with a CancelRequest on a new connection
            // to the proxy, carrying the key the proxy handed out.
            try (Statement st = conn.createStatement()) {
                st.setQueryTimeout(1);
                st.execute("SELECT pg_sleep(5)");
                print("cancel", "none");
            } catch (SQLException e) {
                print("cancel", e.getSQLState());
            }
            // The session is still usable after the cancel.
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT user_id, content FROM notes ORDER BY id")) {
                print("after_cancel", rows(rs));
            }
        }
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null) {
            throw new IllegalStateException(name + " is not set");
        }
        return v;
    }

    static String scalar(Statement st, String sql) throws SQLException {
        try (ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static String rows(ResultSet rs) throws SQLException {
        List<String> out = new ArrayList<>();
        while (rs.next()) {
            out.add(rs.getString(1) + "," + rs.getString(2));
        }
        return String.join(";", out);
    }

    static void print(String check, String value) {
        System.out.println(check + "\t" + value);
    }

    static String oneLine(String s) {
        return s == null ? "" : s.replace('\n', ' ');
    }
}
