// Package pgtest runs a real PostgreSQL server for tests: its own data
// directory (initdb), on a free loopback port, with trust auth, which a
// test may stop and start again (its data kept) to see what the code
// under test does while the database is away.
package pgtest

import (
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver

	"github.com/llproxy/llproxy/internal/porttest"
)

// Server is one postgres process and its data.
type Server struct {
	Port    int
	t       testing.TB
	dir     string
	running bool
}

// bin finds a PostgreSQL program: on PATH, or in Debian's versioned
// directory.
func bin(t testing.TB, name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(matches) == 0 {
		t.Fatalf("%s is not installed (apt-get install postgresql; .ci/run does)", name)
	}
	return matches[len(matches)-1]
}

// asPostgres runs a PostgreSQL program as the postgres user when the test
// runs as root (PostgreSQL refuses root).
func asPostgres(name string, args ...string) *exec.Cmd {
	if os.Geteuid() == 0 {
		return exec.Command("runuser", append([]string{"-u", "postgres", "--", name}, args...)...)
	}
	return exec.Command(name, args...)
}

// Start makes a data directory and starts postgres on a free port; it is
// stopped and removed when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	dir, err := os.MkdirTemp("", "pgtest")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root, PostgreSQL needs its postgres user: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	out, err := asPostgres(bin(t, "initdb"), "-D", filepath.Join(dir, "data"), "-A", "trust", "-U", "postgres",
		"--no-sync", "-E", "UTF8").CombinedOutput()
	if err != nil {
		t.Fatalf("initdb: %v: %s", err, out)
	}
	p, lns := porttest.Listen(t, 1)
	lns[0].Close()
	s := &Server{Port: p, t: t, dir: dir}
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's postgres:// URL, to database postgres.
func (s *Server) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", s.Port)
}

// Stop stops the server at once (as a crash would: pg_ctl's immediate
// mode, which ends every backend too); its data stays.
func (s *Server) Stop() {
	if !s.running {
		return
	}
	out, err := asPostgres(bin(s.t, "pg_ctl"), "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "-w", "stop").CombinedOutput()
	if err != nil {
		s.t.Logf("pg_ctl stop: %v: %s", err, out)
	}
	s.running = false
}

// Restart starts the server again on its port and waits until it takes
// queries.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off", s.Port, s.dir)
	out, err := asPostgres(bin(s.t, "pg_ctl"), "-D", filepath.Join(s.dir, "data"), "-o", opts,
		"-l", filepath.Join(s.dir, "log"), "-w", "-t", "30", "start").CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(s.dir, "log"))
		s.t.Fatalf("postgres: %v: %s %s", err, out, log)
	}
	s.running = true
	db, err := sql.Open("pgx", s.URL())
	if err != nil {
		s.t.Fatal(err)
	}
	defer db.Close()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if err = db.Ping(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("postgres did not start on port %d: %v", s.Port, err)
}
