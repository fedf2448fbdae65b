// JDBC client of the transaction-pooling e2e test (e2e/txpool_clients_test.go).
//
// TXPOOL_CONNS workers, one thread each, run TXPOOL_TXS transactions that
// re-execute the same two PreparedStatements, as named server-side
// statements (prepareThreshold=1: from the first execution), and print one
// line per transaction: "tx<TAB>worker<TAB>i<TAB>kind<TAB>who<TAB>rows<TAB>pids"
// (see the Go test). It connects with the PG* environment variables
// (PGPASSWORD is the token).
//
// The mode, the first argument:
//   plain   each worker keeps one connection and its PreparedStatements;
//           every tenth transaction closes the first one (pgjdbc sends Close
//           for its statement, the statement cache being off) and prepares it
//           again;
//   hikari  the workers share a HikariCP pool of TXPOOL_CONNS connections,
//           borrowing one for each transaction and preparing the statements
//           on it anew: pgjdbc's statement cache hands back the server
//           statement that connection prepared before.

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;

public class TxpoolJdbc {
    static final String WHO = "SELECT current_user::text, current_setting('jwt.claims.sub'), ?::int * 2, pg_backend_pid()";
    static final String NOTES = "SELECT user_id, content FROM notes WHERE id >= ? ORDER BY id";

    public static void main(String[] args) throws Exception {
        String mode = args[0];
        int conns = Integer.parseInt(env("TXPOOL_CONNS"));
        int txs = Integer.parseInt(env("TXPOOL_TXS"));
        String url = "jdbc:postgresql://" + env("PGHOST") + ":" + env("PGPORT") + "/" + env("PGDATABASE");
        Properties props = new Properties();
        props.setProperty("user", env("PGUSER"));
        props.setProperty("password", env("PGPASSWORD"));
        props.setProperty("sslmode", "disable");
        props.setProperty("ApplicationName", "rlsproxy-e2e-txpool-jdbc");
        props.setProperty("connectTimeout", "10");
        props.setProperty("prepareThreshold", "1");
        // pgjdbc sends extra_float_digits and application_name in the startup
        // packet only for a server it assumes 9.0 or later; otherwise it
        // sends SET extra_float_digits = 3 once connected, which pins the
        // session to its backend (a setting the proxy does not carry).
        props.setProperty("assumeMinServerVersion", "9.0");
        HikariDataSource pool = null;
        if (mode.equals("plain")) {
            // Closing a PreparedStatement closes its server statement.
            props.setProperty("preparedStatementCacheQueries", "0");
        } else {
            HikariConfig cfg = new HikariConfig();
            cfg.setJdbcUrl(url);
            cfg.setDataSourceProperties(props);
            cfg.setMaximumPoolSize(conns);
            cfg.setMinimumIdle(conns);
            cfg.setConnectionTimeout(30000);
            pool = new HikariDataSource(cfg);
        }
        AtomicBoolean failed = new AtomicBoolean();
        List<Thread> threads = new ArrayList<>();
        for (int w = 0; w < conns; w++) {
            final int worker = w;
            final HikariDataSource ds = pool;
            Thread t = new Thread(() -> {
                try {
                    if (ds == null) {
                        plain(worker, txs, DriverManager.getConnection(url, props));
                    } else {
                        pooled(worker, txs, ds);
                    }
                } catch (Exception e) {
                    failed.set(true);
                    System.err.println("worker " + worker + ":");
                    e.printStackTrace();
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        if (pool != null) {
            pool.close();
        }
        System.exit(failed.get() ? 1 : 0);
    }

    /** One connection, its PreparedStatements kept from transaction to transaction. */
    static void plain(int worker, int txs, Connection conn) throws SQLException {
        try (conn) {
            PreparedStatement who = conn.prepareStatement(WHO);
            PreparedStatement notes = conn.prepareStatement(NOTES);
            for (int i = 0; i < txs; i++) {
                String kind = kind(i, true);
                if (kind.equals("redo")) {
                    // Close, sent ahead of the next execution, then a new
                    // server statement for the same SQL.
                    who.close();
                    who = conn.prepareStatement(WHO);
                }
                run(worker, i, kind, conn, who, notes);
            }
            who.close();
            notes.close();
        }
    }

    /** A connection borrowed from HikariCP for each transaction. */
    static void pooled(int worker, int txs, HikariDataSource ds) throws SQLException {
        for (int i = 0; i < txs; i++) {
            try (Connection conn = ds.getConnection();
                    PreparedStatement who = conn.prepareStatement(WHO);
                    PreparedStatement notes = conn.prepareStatement(NOTES)) {
                run(worker, i, kind(i, false), conn, who, notes);
            }
        }
    }

    /** Transaction i: a BEGIN ... COMMIT block of three executions, or autocommit ones. */
    static void run(int worker, int i, String kind, Connection conn, PreparedStatement who, PreparedStatement notes)
            throws SQLException {
        String[] w;
        String rows;
        List<String> pids = new ArrayList<>();
        if (kind.equals("block")) {
            conn.setAutoCommit(false);
            w = who(who, i);
            rows = notes(notes);
            String[] w2 = who(who, i);
            conn.commit();
            conn.setAutoCommit(true);
            pids.add(w[1]);
            pids.add(w2[1]);
            if (!w2[0].equals(w[0])) {
                w[0] += "|" + w2[0];
            }
        } else {
            w = who(who, i);
            rows = notes(notes);
            pids.add(w[1]);
        }
        synchronized (TxpoolJdbc.class) {
            System.out.println("tx\t" + worker + "\t" + i + "\t" + kind + "\t" + w[0] + "\t" + rows + "\t"
                    + String.join(",", pids));
            System.out.flush();
        }
    }

    static String kind(int i, boolean redo) {
        if (redo && i % 10 == 9) {
            return "redo";
        }
        return i % 3 == 2 ? "block" : "auto";
    }

    /** Runs WHO with i: "role,sub,2i" and the backend's pid. */
    static String[] who(PreparedStatement ps, int i) throws SQLException {
        ps.setInt(1, i);
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return new String[] {rs.getString(1) + "," + rs.getString(2) + "," + rs.getInt(3), rs.getString(4)};
        }
    }

    static String notes(PreparedStatement ps) throws SQLException {
        ps.setInt(1, 1);
        List<String> rows = new ArrayList<>();
        try (ResultSet rs = ps.executeQuery()) {
            while (rs.next()) {
                rows.add(rs.getString(1) + "," + rs.getString(2));
            }
        }
        return String.join(";", rows);
    }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null) {
            throw new IllegalStateException(name + " is not set");
        }
        return v;
    }
}
