// Package redistest runs a real redis-server for tests, on a free
// loopback port, with nothing persisted: stopped, it loses every key, as
// a Redis without persistence does when it restarts.
package redistest

import (
	"bytes"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/llproxy/llproxy/internal/porttest"
)

// Server is one redis-server process.
type Server struct {
	Port int
	t    testing.TB
	cmd  *exec.Cmd
	out  *syncBuffer // what it printed, where kept
}

// Start starts redis-server on a free port; it is stopped when the test
// ends. redis-server must be installed (.ci/run installs it).
func Start(t testing.TB) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatalf("redis-server is not installed (apt-get install redis-server; .ci/run does): %v", err)
	}
	p, lns := porttest.Listen(t, 1)
	lns[0].Close()
	s := &Server{Port: p, t: t}
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return "redis://127.0.0.1:" + strconv.Itoa(s.Port) + "/0" }

// Stop kills the server (its keys are gone).
func (s *Server) Stop() {
	if s.cmd != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// Restart starts the server again on its port, empty, and waits until it
// answers.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.cmd = exec.Command("redis-server", "--port", strconv.Itoa(s.Port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.t.TempDir())
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("redis-server: %v", err)
	}
	s.wait()
}

// wait waits until the server answers PING.
func (s *Server) wait() {
	s.t.Helper()
	for range 500 {
		if c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.Port)); err == nil {
			c.Write([]byte("PING\r\n"))
			buf := make([]byte, 7)
			c.SetReadDeadline(time.Now().Add(time.Second))
			n, _ := c.Read(buf)
			c.Close()
			if string(buf[:n]) == "+PONG\r\n" {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	out := ""
	if s.out != nil {
		out = s.out.String()
	}
	s.t.Fatalf("redis-server on port %d did not answer: %s", s.Port, out)
}

// syncBuffer is a bytes.Buffer a process writes while a test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
