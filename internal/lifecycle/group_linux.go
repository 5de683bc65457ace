package lifecycle

import "syscall"

// groupAttr runs a model server in its own process group, so that stopping
// it reaches whatever it starts, and has the kernel SIGKILL it if llproxy
// dies without stopping it (see spawns).
func groupAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// signalGroup signals the process group of pid: SIGTERM, or SIGKILL if
// kill.
func signalGroup(pid int, kill bool) {
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	syscall.Kill(-pid, sig)
}
