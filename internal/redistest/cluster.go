package redistest

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/llproxy/llproxy/internal/porttest"
)

// Cluster is a Redis Cluster of masters only, each a redis-server of its
// own on a free port, its slots spread by redis-cli --cluster create.
type Cluster struct {
	Ports []int
}

// StartCluster starts a Redis Cluster of n masters (at least 3) and waits
// until it serves every slot; it is stopped when the test ends.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	if _, err := exec.LookPath("redis-cli"); err != nil {
		t.Fatalf("redis-cli is not installed (apt-get install redis-server; .ci/run does): %v", err)
	}
	// n ports for clients and n for the cluster bus (by default a node's
	// port + 10000, which nothing reserved): one free block.
	ports, lns := porttest.Listen(t, 2*n)
	for _, ln := range lns {
		ln.Close()
	}
	c := &Cluster{}
	var addrs []string
	for i := range n {
		p := ports + i
		dir := t.TempDir()
		s := &Server{Port: p, t: t, out: &syncBuffer{}}
		s.cmd = exec.Command("redis-server", "--port", strconv.Itoa(p), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir, "--cluster-enabled", "yes",
			"--cluster-config-file", dir+"/nodes.conf", "--cluster-node-timeout", "5000",
			"--cluster-port", strconv.Itoa(ports+n+i))
		s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
		if err := s.cmd.Start(); err != nil {
			t.Fatalf("redis-server: %v", err)
		}
		t.Cleanup(s.Stop)
		s.wait()
		c.Ports = append(c.Ports, p)
		addrs = append(addrs, "127.0.0.1:"+strconv.Itoa(p))
	}
	out, err := exec.Command("redis-cli", append(append([]string{"--cluster", "create"}, addrs...),
		"--cluster-replicas", "0", "--cluster-yes")...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v: %s", err, out)
	}
	for range 500 {
		ok := true
		for _, p := range c.Ports {
			info, _ := exec.Command("redis-cli", "-p", strconv.Itoa(p), "cluster", "info").Output()
			ok = ok && strings.Contains(string(info), "cluster_state:ok")
		}
		if ok {
			return c
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the cluster on %v never served every slot", c.Ports)
	return nil
}

// URL is the cluster's URL as replicas.Config takes it with cluster true:
// one node, the others as addr parameters.
func (c *Cluster) URL() string {
	u := "redis://127.0.0.1:" + strconv.Itoa(c.Ports[0])
	for i, p := range c.Ports[1:] {
		sep := "&"
		if i == 0 {
			sep = "?"
		}
		u += sep + "addr=127.0.0.1:" + strconv.Itoa(p)
	}
	return u
}
