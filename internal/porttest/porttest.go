// Package porttest helps tests that need servers on neighbouring ports, as
// port-range discovery does: it finds a block of free loopback ports and
// holds them open.
package porttest

import (
	"math/rand/v2"
	"net"
	"strconv"
	"testing"
)

// Listen listens on n consecutive loopback ports and returns the first port
// and the listeners, which the caller serves on or closes. It fails the test
// if no such block is free after 50 tries.
func Listen(t testing.TB, n int) (int, []net.Listener) {
	t.Helper()
	for range 50 {
		base := 20000 + rand.IntN(30000)
		var lns []net.Listener
		for i := range n {
			ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(base+i))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		if len(lns) == n {
			return base, lns
		}
		for _, ln := range lns {
			ln.Close()
		}
	}
	t.Fatal("porttest: no block of free loopback ports")
	return 0, nil
}
