//go:build linux

package lifecycle

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/porttest"
)

// llproxyBin is the llproxy binary, built once; its mock-server subcommand
// is the model server the tests start and stop.
var llproxyBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "lifecycle")
	if err != nil {
		panic(err)
	}
	llproxyBin = filepath.Join(dir, "llproxy")
	if out, err := exec.Command("go", "build", "-o", llproxyBin, "../../cmd/llproxy").CombinedOutput(); err != nil {
		panic(string(out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// fakeClock fires AfterFunc timers when advanced.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c       *fakeClock
	at      time.Time
	f       func()
	stopped bool
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := !t.stopped
	t.stopped = true
	return was
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), f: f}
	c.timers = append(c.timers, t)
	return t
}

// Advance moves time on and runs the timers that came due, in order.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []*fakeTimer
	keep := c.timers[:0]
	for _, t := range c.timers {
		if !t.stopped && !t.at.After(c.now) {
			t.stopped = true
			due = append(due, t)
		} else if !t.stopped {
			keep = append(keep, t)
		}
	}
	c.timers = keep
	c.mu.Unlock()
	sort.Slice(due, func(i, j int) bool { return due[i].at.Before(due[j].at) })
	for _, t := range due {
		t.f()
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	port, lns := porttest.Listen(t, 1)
	lns[0].Close()
	return port
}

// spec is a managed mock server on a free port.
func spec(t *testing.T, name, group string) Spec {
	t.Helper()
	port := freePort(t)
	u, _ := url.Parse("http://127.0.0.1:" + strconv.Itoa(port))
	return Spec{Name: name, URL: u, Group: group, UnloadAfter: time.Minute, ReadyTimeout: 20 * time.Second,
		StopGrace: 2 * time.Second, Models: []string{name + "-model"},
		Cmd: []string{llproxyBin, "mock-server", "-listen", u.Host}}
}

func newManager(t *testing.T, clock *fakeClock, specs ...Spec) *Manager {
	t.Helper()
	m := New(specs, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Clock: clock, MaxSwapWait: 10 * time.Second})
	t.Cleanup(m.Shutdown)
	return m
}

func state(m *Manager, name string) Status {
	for _, s := range m.Status() {
		if s.Name == name {
			return s
		}
	}
	return Status{}
}

func waitState(t *testing.T, m *Manager, name string, want State) {
	t.Helper()
	require.Eventually(t, func() bool { return state(m, name).State == want }, 20*time.Second, 5*time.Millisecond,
		"%s should be %s, is %+v", name, want, state(m, name))
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func answers(t *testing.T, s Spec) bool {
	t.Helper()
	resp, err := http.Get(s.URL.JoinPath("/v1/models").String())
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == 200
}

func TestStartsOnDemandAndUnloadsWhenIdle(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	a := spec(t, "a", "")
	m := newManager(t, clock, a)
	assert.Equal(t, Stopped, state(m, "a").State, "nothing starts until asked for")
	release, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	st := state(m, "a")
	assert.Equal(t, Ready, st.State)
	assert.Positive(t, st.PID)
	assert.Equal(t, 1, st.InFlight)
	assert.True(t, answers(t, a), "ready means it answers")

	clock.Advance(time.Hour)
	assert.Equal(t, Ready, state(m, "a").State, "never unloaded while a request is in flight")
	release()
	assert.Equal(t, clock.Now().Add(time.Minute), state(m, "a").UnloadAt)
	clock.Advance(59 * time.Second)
	assert.Equal(t, Ready, state(m, "a").State)
	clock.Advance(2 * time.Second)
	waitState(t, m, "a", Stopped)
	assert.False(t, alive(st.PID), "the process is gone")

	// And it starts again on the next request.
	release, err = m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	release()
}

func TestKeepAlive(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	m := newManager(t, clock, spec(t, "a", ""))
	use := func() {
		release, err := m.Acquire(context.Background(), "a")
		require.NoError(t, err)
		release()
	}
	m.KeepAlive("a", -1, true) // an admin's pin: never
	use()
	clock.Advance(24 * time.Hour)
	assert.Equal(t, Ready, state(m, "a").State)
	assert.True(t, state(m, "a").UnloadAt.IsZero())

	m.KeepAlive("a", 10*time.Minute, true)
	use()
	clock.Advance(9 * time.Minute)
	assert.Equal(t, Ready, state(m, "a").State)
	clock.Advance(2 * time.Minute) // past the keep-alive: unloaded
	waitState(t, m, "a", Stopped)

	m.KeepAlive("a", 0, false) // unload right after this request
	use()
	clock.Advance(0)
	waitState(t, m, "a", Stopped)

	// Anyone else's pin is clamped to the configured idle time (1 min).
	for _, d := range []time.Duration{-1, time.Hour} {
		m.KeepAlive("a", d, false)
		use()
		clock.Advance(time.Minute - time.Second)
		assert.Equal(t, Ready, state(m, "a").State)
		clock.Advance(2 * time.Second)
		waitState(t, m, "a", Stopped)
	}
	m.KeepAlive("a", 30*time.Second, false) // shorter than the idle time: as asked
	use()
	clock.Advance(31 * time.Second)
	waitState(t, m, "a", Stopped)
}

// An unload asked for while a request runs (Ollama's keep_alive 0, what
// `ollama stop` sends) is not dropped: the server stops when the request
// ends, as Ollama does.
func TestUnloadWaitsForTheLastRequest(t *testing.T) {
	m := newManager(t, &fakeClock{now: time.Unix(1000, 0)}, spec(t, "a", ""), spec(t, "b", ""))
	ra, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	rb, err := m.Acquire(context.Background(), "b")
	require.NoError(t, err)
	rb()
	u := m.Unload("")
	assert.Equal(t, []string{"b"}, u.Stopped, "b now")
	assert.Equal(t, []Deferred{{Name: "a", InFlight: 1}}, u.Deferred, "a when its request ends")
	assert.Equal(t, Stopped, state(m, "b").State, "answered once its process is gone")
	assert.Equal(t, Ready, state(m, "a").State, "a is streaming: it stays until then")
	ra()
	waitState(t, m, "a", Stopped)
	assert.Empty(t, m.Unload("a").Stopped, "nothing left to unload")
}

// A request queued in the gateway for an idle server keeps it loaded; when
// its client gives up instead, the server is still unloaded later: the
// timer is armed again, never forgotten.
func TestIdleUnloadAfterQueuedRequestsLeave(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	var queued atomic.Int64
	a := spec(t, "a", "")
	m := New([]Spec{a}, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Clock: clock,
		Queued: func(string) int { return int(queued.Load()) }})
	t.Cleanup(m.Shutdown)
	release, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	release()
	queued.Store(1) // a request waits in the gateway's queue for a-model
	clock.Advance(61 * time.Second)
	st := state(m, "a")
	assert.Equal(t, Ready, st.State, "kept for the queued request")
	assert.True(t, st.UnloadAt.After(clock.Now()), "and its unload is still planned: %v", st.UnloadAt)
	queued.Store(0) // its client gave up
	clock.Advance(61 * time.Second)
	waitState(t, m, "a", Stopped)
}

// A drain is made for the model that waited: once the drained model stops,
// the waiting one starts, even if requests for the drained model arrived
// meanwhile; the drained model cannot take the group back first.
func TestSwapDoesNotThrash(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	m := newManager(t, clock, spec(t, "a", "gpu"), spec(t, "b", "gpu"))
	ra, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	gotB := make(chan func(), 1)
	go func() {
		rb, err := m.Acquire(context.Background(), "b")
		assert.NoError(t, err)
		gotB <- rb
	}()
	require.Eventually(t, func() bool { return state(m, "b").Queued == 1 }, 5*time.Second, time.Millisecond)
	clock.Advance(11 * time.Second) // b's grace is over: a drains for b
	require.Eventually(t, func() bool { return state(m, "a").Draining }, 5*time.Second, time.Millisecond)
	const more = 6
	gotA := make(chan func(), more)
	for range more { // more work for a arrives while it drains
		go func() {
			ra2, err := m.Acquire(context.Background(), "a")
			assert.NoError(t, err)
			gotA <- ra2
		}()
	}
	require.Eventually(t, func() bool { return state(m, "a").Queued == more }, 5*time.Second, time.Millisecond)
	ra() // a's last request ends: a stops, and b (not a) gets the GPU
	rb := <-gotB
	assert.Equal(t, Ready, state(m, "b").State)
	assert.NotEqual(t, Ready, state(m, "a").State)
	select {
	case <-gotA:
		t.Fatal("the drained model took the group back before the model it was drained for ran")
	default:
	}
	rb()
	clock.Advance(11 * time.Second) // a's turn, after b's grace if b were still busy
	for range more {
		(<-gotA)()
	}
	assert.Equal(t, Ready, state(m, "a").State)
}

func TestSwapWithinAGroup(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	a, b := spec(t, "a", "gpu"), spec(t, "b", "gpu")
	m := newManager(t, clock, a, b)
	ra, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	pidA := state(m, "a").PID

	// b must wait: a is serving, and its grace (maxSwapWait) is not over.
	got := make(chan error, 1)
	go func() {
		rb, err := m.Acquire(context.Background(), "b")
		if err == nil {
			defer rb()
		}
		got <- err
	}()
	require.Eventually(t, func() bool { return state(m, "b").Queued == 1 }, 5*time.Second, time.Millisecond)
	assert.Equal(t, Ready, state(m, "a").State)
	assert.Equal(t, Stopped, state(m, "b").State, "one model per group")

	// The grace runs out: a drains (its request finishes), then b starts.
	clock.Advance(11 * time.Second)
	require.Eventually(t, func() bool { return state(m, "a").Draining }, 5*time.Second, time.Millisecond)
	_, err = m.Acquire(ctxTimeout(t, 100*time.Millisecond), "a")
	assert.Error(t, err, "a drains: no new sends while b waits")
	ra()
	require.NoError(t, <-got)
	assert.False(t, alive(pidA), "a was stopped before b started")
	assert.Equal(t, Stopped, state(m, "a").State)
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestSwapAtOnceWhenTheLoadedModelIsIdle(t *testing.T) {
	m := newManager(t, &fakeClock{now: time.Unix(1000, 0)}, spec(t, "a", "gpu"), spec(t, "b", "gpu"))
	ra, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	ra()
	rb, err := m.Acquire(context.Background(), "b")
	require.NoError(t, err)
	defer rb()
	assert.Equal(t, Stopped, state(m, "a").State)
	assert.Equal(t, Ready, state(m, "b").State)
}

func TestStartFailureIsAnErrorNotAHang(t *testing.T) {
	bad := spec(t, "bad", "")
	bad.Cmd = []string{"sh", "-c", "echo cannot load the model >&2; exit 3"}
	missing := spec(t, "missing", "")
	missing.Cmd = []string{"/nonexistent/llama-server"}
	m := newManager(t, &fakeClock{now: time.Unix(1000, 0)}, bad, missing)
	_, err := m.Acquire(ctxTimeout(t, 10*time.Second), "bad")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "exited before it was ready")
	assert.Equal(t, Failed, state(m, "bad").State)
	_, err = m.Acquire(ctxTimeout(t, 10*time.Second), "missing")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no such file")
}

func TestCrashWhileServingThenRestart(t *testing.T) {
	m := newManager(t, &fakeClock{now: time.Unix(1000, 0)}, spec(t, "a", ""))
	release, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	pid := state(m, "a").PID
	syscall.Kill(pid, syscall.SIGKILL)
	waitState(t, m, "a", Failed)
	assert.Contains(t, state(m, "a").Error, "exited while serving")
	release()
	release, err = m.Acquire(context.Background(), "a")
	require.NoError(t, err, "the next request starts it again")
	assert.NotEqual(t, pid, state(m, "a").PID)
	release()
}

func TestShutdownLeavesNoProcess(t *testing.T) {
	a := spec(t, "a", "")
	// A wrapper with a child of its own: both must go.
	a.Cmd = []string{"sh", "-c", fmt.Sprintf("sleep 300 & exec %s mock-server -listen %s", llproxyBin, a.URL.Host)}
	m := New([]Spec{a}, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	release, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	pgid := state(m, "a").PID
	release()
	m.Shutdown()
	require.Eventually(t, func() bool { return len(running(pgid)) == 0 }, 5*time.Second, 10*time.Millisecond,
		"processes left in its group: %v", running(pgid))
	_, err = m.Acquire(context.Background(), "a")
	assert.ErrorIs(t, err, ErrClosed)
}

// running lists the processes of group pgid that are not dead (zombies,
// waiting for init to reap them, are dead).
func running(pgid int) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		if len(f) > 2 && f[2] == strconv.Itoa(pgid) && f[0] != "Z" {
			out = append(out, pid)
		}
	}
	return out
}

func TestSecretsStayOutOfTheServersEnvironment(t *testing.T) {
	t.Setenv("OPENAI_API_KEY", "sk-not-for-local-servers")
	t.Setenv("HARMLESS", "yes")
	a := spec(t, "a", "")
	out := filepath.Join(t.TempDir(), "env")
	a.Cmd = []string{"sh", "-c", fmt.Sprintf("env > %s; exec %s mock-server -listen %s", out, llproxyBin, a.URL.Host)}
	m := New([]Spec{a}, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Secrets: []string{"sk-not-for-local-servers"}})
	defer m.Shutdown()
	release, err := m.Acquire(context.Background(), "a")
	require.NoError(t, err)
	release()
	env, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Contains(t, string(env), "HARMLESS=yes")
	assert.NotContains(t, string(env), "sk-not-for-local-servers")
}
