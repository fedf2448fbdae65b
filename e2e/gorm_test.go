package e2e

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/rlsproxy/rlsproxy/internal/demo"
	"github.com/rlsproxy/rlsproxy/internal/proxytest"
)

// The models GORM migrates, in a schema of the test's own (gorm_e2e, on the
// connection's search_path): a table with a unique index and a table with
// a foreign key, a composite index and a default.
type toolGormAuthor struct {
	ID        uint           `gorm:"primaryKey"`
	Name      string         `gorm:"size:100;not null;uniqueIndex"`
	Books     []toolGormBook `gorm:"foreignKey:AuthorID"`
	CreatedAt time.Time
}

func (toolGormAuthor) TableName() string { return "authors" }

type toolGormBook struct {
	ID       uint   `gorm:"primaryKey"`
	AuthorID uint   `gorm:"not null;index"`
	Title    string `gorm:"not null;index:idx_books_title_year,priority:1"`
	Year     int    `gorm:"index:idx_books_title_year,priority:2"`
	Price    string `gorm:"type:numeric(10,2);not null;default:0"`
}

func (toolGormBook) TableName() string { return "books" }

// toolGormNote is the demo's RLS table; user_id defaults to the claim.
type toolGormNote struct {
	ID      uint   `gorm:"primaryKey"`
	UserID  string `gorm:"default:null"`
	Content string
}

func (toolGormNote) TableName() string { return "public.notes" }

// toolGormLog records the SQL GORM runs, so the test can tell what a
// migration did.
type toolGormLog struct {
	mu   sync.Mutex
	sqls []string
}

func (l *toolGormLog) LogMode(logger.LogLevel) logger.Interface { return l }
func (l *toolGormLog) Info(context.Context, string, ...any)     {}
func (l *toolGormLog) Warn(context.Context, string, ...any)     {}
func (l *toolGormLog) Error(context.Context, string, ...any)    {}
func (l *toolGormLog) Trace(_ context.Context, _ time.Time, fc func() (string, int64), _ error) {
	sql, _ := fc()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sqls = append(l.sqls, sql)
}

// take returns the SQL recorded since the last take.
func (l *toolGormLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	sqls := l.sqls
	l.sqls = nil
	return sqls
}

// toolDDL reports a statement that changes the schema.
func toolDDL(sql string) bool {
	word, _, _ := strings.Cut(strings.TrimSpace(sql), " ")
	switch strings.ToUpper(word) {
	case "CREATE", "ALTER", "DROP", "COMMENT":
		return true
	}
	return false
}

// errToolRollback ends a GORM transaction the test does not keep: the demo
// notes are shared by every test.
var errToolRollback = errors.New("rollback")

// TestGORM runs GORM (gorm.io/driver/postgres, over pgx v5) through the
// proxy: AutoMigrate creates tables and indexes, a second AutoMigrate reads
// the catalog and changes nothing, then rows are created and read, and the
// session is checked for the token's identity. pgx prepares and caches its
// statements (Parse/Describe/Sync, then Bind/Execute/Sync); with
// PreferSimpleProtocol it sends each as a plain Query.
func TestGORM(t *testing.T) {
	modes := []struct {
		name   string
		simple bool
	}{{"extended", false}, {"simple", true}}
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			p := proxytest.Start(t, pg, s.opts...)
			for _, mode := range modes {
				t.Run(mode.name, func(t *testing.T) {
					// A fresh schema: the first AutoMigrate of each run must
					// create everything.
					toolMustExec(t, demo.Database, "DROP SCHEMA IF EXISTS gorm_e2e CASCADE; CREATE SCHEMA gorm_e2e; GRANT USAGE, CREATE ON SCHEMA gorm_e2e TO authenticated")
					for _, user := range users {
						t.Run(user, func(t *testing.T) { testGORM(t, p, user, mode.simple) })
					}
				})
			}
		})
	}
}

func testGORM(t *testing.T, p *proxytest.Proxy, user string, simple bool) {
	log := &toolGormLog{}
	// search_path goes to the server as a startup parameter.
	dsn := p.DSN(user, p.Token(t, user)) + " search_path=gorm_e2e application_name=rlsproxy-e2e-gorm"
	db, err := gorm.Open(postgres.New(postgres.Config{DSN: dsn, PreferSimpleProtocol: simple}), &gorm.Config{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sqlDB.Close() })
	db = db.WithContext(t.Context())

	if err := db.AutoMigrate(&toolGormAuthor{}, &toolGormBook{}); err != nil {
		t.Fatalf("AutoMigrate: %v", err)
	}
	first := log.take()
	// user1 migrates the fresh schema; user2 finds it done.
	if user == users[0] {
		for _, want := range []string{`CREATE TABLE "authors"`, `CREATE TABLE "books"`,
			`CREATE UNIQUE INDEX IF NOT EXISTS "idx_authors_name"`, `CREATE INDEX IF NOT EXISTS "idx_books_title_year"`,
			`CONSTRAINT "fk_authors_books" FOREIGN KEY`} {
			if !slices.ContainsFunc(first, func(sql string) bool { return strings.Contains(sql, want) }) {
				t.Errorf("the first AutoMigrate ran no %s:\n%s", want, strings.Join(first, "\n"))
			}
		}
	}
	if err := db.AutoMigrate(&toolGormAuthor{}, &toolGormBook{}); err != nil {
		t.Fatalf("second AutoMigrate: %v", err)
	}
	second := log.take()
	if len(second) == 0 {
		t.Errorf("the second AutoMigrate ran nothing: it should have read the catalog")
	}
	for _, sql := range second {
		if toolDDL(sql) {
			t.Errorf("the second AutoMigrate changed the schema: %s", sql)
		}
	}

	author := toolGormAuthor{Name: "author of " + user, Books: []toolGormBook{
		{Title: "first of " + user, Year: 2001, Price: "9.50"},
		{Title: "second of " + user, Year: 2002},
	}}
	if err := db.Create(&author).Error; err != nil {
		t.Fatalf("Create: %v", err)
	}
	var found toolGormAuthor
	if err := db.Preload("Books", func(db *gorm.DB) *gorm.DB { return db.Order("id") }).
		First(&found, "name = ?", "author of "+user).Error; err != nil {
		t.Fatalf("Find: %v", err)
	}
	var titles []string
	for _, b := range found.Books {
		titles = append(titles, fmt.Sprintf("%s/%d/%s", b.Title, b.Year, b.Price))
	}
	if got, want := strings.Join(titles, ";"), fmt.Sprintf("first of %s/2001/9.50;second of %s/2002/0.00", user, user); found.ID != author.ID || got != want {
		t.Errorf("found author %d with books %q, want author %d with %q", found.ID, got, author.ID, want)
	}

	var currentUser, sub string
	if err := db.Raw("SELECT current_user").Scan(&currentUser).Error; err != nil {
		t.Fatal(err)
	}
	if err := db.Raw("SELECT current_setting('jwt.claims.sub')").Scan(&sub).Error; err != nil {
		t.Fatal(err)
	}
	if currentUser != wantValue("current_user", user) || sub != user {
		t.Errorf("current_user = %q, sub = %q; want %q, %q", currentUser, sub, wantValue("current_user", user), user)
	}
	var notes []toolGormNote
	if err := db.Order("id").Find(&notes).Error; err != nil {
		t.Fatal(err)
	}
	var rows []string
	for _, n := range notes {
		rows = append(rows, n.UserID+","+n.Content)
	}
	if got := strings.Join(rows, ";"); got != wantRows(user) {
		t.Errorf("notes = %q, want %q", got, wantRows(user))
	}

	// A note created without a user_id belongs to the claim's subject; one
	// for someone else is refused by the policy.
	err = db.Transaction(func(tx *gorm.DB) error {
		note := toolGormNote{Content: "gorm: created"}
		if err := tx.Create(&note).Error; err != nil {
			return err
		}
		var owner string
		if err := tx.Raw("SELECT user_id FROM public.notes WHERE id = ?", note.ID).Scan(&owner).Error; err != nil {
			return err
		}
		if owner != user {
			t.Errorf("a note created by %s belongs to %q", user, owner)
		}
		return errToolRollback
	})
	if !errors.Is(err, errToolRollback) {
		t.Errorf("creating a note: %v", err)
	}
	err = db.Create(&toolGormNote{UserID: "someone-else", Content: "forged"}).Error
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); !ok || pgErr.Code != wantValue("insert_denied", user) {
		t.Errorf("creating a note for someone else: got %v, want SQLSTATE %s", err, wantValue("insert_denied", user))
	}
	if t.Failed() {
		t.Logf("SQL of the first AutoMigrate:\n%s\nof the second:\n%s", strings.Join(first, "\n"), strings.Join(second, "\n"))
	}
}
