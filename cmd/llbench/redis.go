package main

import (
	"fmt"
	"net"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// redisProc is a redis-server llbench runs itself (-redis start), so that
// it can kill it mid-run and start it again, empty, on the same port.
type redisProc struct {
	addr string
	mu   sync.Mutex
	cmd  *exec.Cmd
}

func startRedis() (*redisProc, error) {
	r := &redisProc{addr: freeAddr()}
	return r, r.start()
}

func (r *redisProc) url() string { return "redis://" + r.addr + "/0" }

func (r *redisProc) start() error {
	_, port, _ := strings.Cut(r.addr, ":")
	cmd := exec.Command("redis-server", "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("redis-server: %w", err)
	}
	r.mu.Lock()
	r.cmd = cmd
	r.mu.Unlock()
	for range 250 {
		if c, err := net.Dial("tcp", r.addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("redis-server: not listening on %s within 5s", r.addr)
}

// kill stops it at once (SIGKILL: nothing saved, connections cut).
func (r *redisProc) kill() {
	r.mu.Lock()
	cmd := r.cmd
	r.cmd = nil
	r.mu.Unlock()
	if cmd != nil {
		cmd.Process.Kill()
		cmd.Wait()
	}
}

// outage kills Redis after `after` and starts it again, empty, down
// later; it returns at once.
func (r *redisProc) outage(after, down time.Duration) {
	go func() {
		time.Sleep(after)
		r.kill()
		time.Sleep(down)
		if err := r.start(); err != nil {
			fmt.Println("llbench:", err)
			return
		}
		fmt.Printf("(Redis killed %s into the run, started again empty %s later)\n", after, down)
	}()
}
