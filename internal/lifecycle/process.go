package lifecycle

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"time"

	"github.com/llproxy/llproxy/internal/safe"
)

// start launches p's command in a process group of its own (so that stop
// and shutdown reach every process it spawns), sends its output to the log
// under the backend's name, and waits in the background until its ready
// check answers 2xx, it exits, or the ready timeout passes. m.mu is held.
func (m *Manager) start(p *proc) {
	p.state = Starting
	p.startSeq++
	p.err = nil
	p.unloadAsk = false
	if g := p.spec.Group; g != "" && m.next[g] == p {
		delete(m.next, g) // the swap made for it is done
	}
	seq := p.startSeq
	cmd := exec.Command(p.spec.Cmd[0], p.spec.Cmd[1:]...)
	cmd.Dir = p.spec.Dir
	cmd.Env = append(append([]string(nil), m.env...), p.spec.Env...)
	// Its own process group, so that stopping it reaches whatever it
	// starts; and SIGKILL if llproxy itself dies without stopping it.
	cmd.SysProcAttr = groupAttr()
	// A pipe of our own rather than StdoutPipe: Wait must not close it
	// under the reader, or the last lines (often the reason it failed) are
	// lost; the reader ends when every process holding it has.
	out, w, err := os.Pipe()
	if err == nil {
		cmd.Stdout, cmd.Stderr = w, w
		err = spawn(cmd)
		w.Close()
		if err != nil {
			out.Close()
		}
	}
	if err != nil {
		m.failed(p, seq, fmt.Errorf("starting %s: %w", p.spec.Name, err))
		return
	}
	p.cmd = cmd
	p.exited = make(chan struct{})
	m.log.Info("backend starting", "backend", p.spec.Name, "pid", cmd.Process.Pid, "cmd", p.spec.Cmd[0])
	safe.Go(m.log, "output of "+p.spec.Name, func() { m.pipeLog(p.spec.Name, out) })
	exited := p.exited
	go func() {
		err := cmd.Wait()
		// Whatever the server left behind in its group goes with it.
		signalGroup(cmd.Process.Pid, true)
		m.mu.Lock()
		defer m.mu.Unlock()
		close(exited)
		m.exited(p, seq, err)
	}()
	safe.Go(m.log, "ready check of "+p.spec.Name, func() { m.awaitReady(p, seq, exited) })
}

// pipeLog copies a process's output to the log, a line at a time, until
// every process writing to it is gone.
func (m *Manager) pipeLog(name string, r io.ReadCloser) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m.log.Info("backend output", "backend", name, "line", sc.Text())
	}
}

// awaitReady polls the ready check until it answers, the process exits or
// the timeout passes.
func (m *Manager) awaitReady(p *proc, seq int, exited <-chan struct{}) {
	url := p.spec.URL.JoinPath(p.spec.ReadyPath).String()
	deadline := time.Now().Add(p.spec.ReadyTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := m.client.Do(req)
		cancel()
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				m.mu.Lock()
				if p.startSeq == seq && p.state == Starting {
					p.state = Ready
					p.readyAt = m.clock.Now()
					m.log.Info("backend ready", "backend", p.spec.Name, "pid", p.cmd.Process.Pid)
					m.broadcast()
				}
				m.mu.Unlock()
				return
			}
		}
		select {
		case <-exited:
			return // exited reports it
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			m.mu.Lock()
			if p.startSeq == seq && p.state == Starting {
				m.failed(p, seq, fmt.Errorf("backend %s not ready at %s within %s", p.spec.Name, url, p.spec.ReadyTimeout))
				m.kill(p)
			}
			m.mu.Unlock()
			return
		}
	}
}

// exited records the end of p's process. m.mu is held.
func (m *Manager) exited(p *proc, seq int, err error) {
	if p.startSeq != seq {
		return
	}
	switch p.state {
	case Stopping:
		p.state = Stopped
		m.log.Info("backend stopped", "backend", p.spec.Name)
	case Starting:
		if err == nil {
			err = errors.New("exited")
		}
		m.failed(p, seq, fmt.Errorf("backend %s exited before it was ready: %w", p.spec.Name, err))
	case Ready:
		if err == nil {
			err = errors.New("exited")
		}
		p.state, p.err = Failed, fmt.Errorf("backend %s exited while serving: %w", p.spec.Name, err)
		m.log.Warn("backend crashed", "backend", p.spec.Name, "err", err)
	}
	p.cmd, p.draining = nil, false
	m.broadcast()
}

// failed marks a start that did not succeed. m.mu is held.
func (m *Manager) failed(p *proc, seq int, err error) {
	if p.startSeq != seq {
		return
	}
	p.state, p.err = Failed, err
	m.log.Warn("backend failed", "backend", p.spec.Name, "err", err)
	m.broadcast()
}

// stop asks p's process group to end (SIGTERM), and kills it after the
// grace period. m.mu is held; the exit is reported by the process's waiter.
func (m *Manager) stop(p *proc) {
	if p.cmd == nil || (p.state != Ready && p.state != Starting) {
		return
	}
	p.state = Stopping
	m.cancelUnload(p)
	pid, exited, grace := p.cmd.Process.Pid, p.exited, p.spec.StopGrace
	m.log.Info("backend stopping", "backend", p.spec.Name, "pid", pid)
	signalGroup(pid, false)
	go func() {
		select {
		case <-exited:
		case <-time.After(grace):
			signalGroup(pid, true)
		}
	}()
	m.broadcast()
}

// kill ends p's process group at once. m.mu is held.
func (m *Manager) kill(p *proc) {
	if p.cmd != nil {
		signalGroup(p.cmd.Process.Pid, true)
	}
}

// spawns runs every process start on one OS thread that lives as long as
// llproxy: Linux delivers Pdeathsig when the thread that forked a child
// exits, not the process, and Go may end other threads.
var spawns = make(chan spawnReq)

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: this thread never exits
		for r := range spawns {
			r.done <- r.cmd.Start()
		}
	}()
}

// spawn starts cmd on the spawning thread.
func spawn(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	spawns <- spawnReq{cmd, done}
	return <-done
}
