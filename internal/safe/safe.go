// Package safe keeps the gateway's own goroutines from taking the process
// down: a panic in one (a health check, a scan, a timer, a process
// watcher) is logged with its stack and ends that goroutine, or that round
// of a loop, instead of every request in flight.
//
// It exists so that every goroutine the gateway starts recovers the same
// way; request handlers have their own recovery, which also answers the
// client.
package safe

import (
	"fmt"
	"log/slog"
	"runtime/debug"
)

// Recover logs a panic in progress as what failed. Defer it directly:
//
//	defer safe.Recover(log, "health check")
func Recover(log *slog.Logger, what string) {
	if p := recover(); p != nil {
		if log == nil {
			log = slog.Default()
		}
		log.Error("panic recovered: "+what, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
	}
}

// Go runs f in a new goroutine that recovers.
func Go(log *slog.Logger, what string, f func()) {
	go func() {
		defer Recover(log, what)
		f()
	}()
}

// Func returns f made to recover, for timers and wait groups.
func Func(log *slog.Logger, what string, f func()) func() {
	return func() {
		defer Recover(log, what)
		f()
	}
}
