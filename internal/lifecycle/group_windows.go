package lifecycle

import (
	"os"
	"syscall"
)

// groupAttr starts a model server in a process group of its own. Windows
// has no SIGTERM and no parent-death signal: a stop terminates the server
// process itself (processes it started may survive it), and a server
// outlives an llproxy that is killed. Documented in the README.
func groupAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{CreationFlags: syscall.CREATE_NEW_PROCESS_GROUP}
}

// signalGroup ends the process pid (there is no graceful stop to ask for).
func signalGroup(pid int, _ bool) {
	if p, err := os.FindProcess(pid); err == nil {
		p.Kill()
	}
}
