//go:build unix && !linux

package lifecycle

import "syscall"

// groupAttr runs a model server in its own process group, so that stopping
// it reaches whatever it starts. Outside Linux there is no parent-death
// signal: a model server outlives an llproxy killed with SIGKILL (a clean
// stop, SIGTERM included, still stops it).
func groupAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }

// signalGroup signals the process group of pid: SIGTERM, or SIGKILL if
// kill.
func signalGroup(pid int, kill bool) {
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	syscall.Kill(-pid, sig)
}
