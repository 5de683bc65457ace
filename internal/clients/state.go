package clients

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/llproxy/llproxy/internal/safe"
)

// The state file keeps the clients' token use today and their spend in
// money today and this month across restarts, so that a restart does not
// hand out a fresh budget. It is written
// atomically (a temporary file renamed over the old one), at least every
// SaveEvery while usage changes and once more at shutdown. A file that
// cannot be read back is a start-up error: silently starting from zero
// would lift every budget.

// persistence is what a directory's state file holds across reloads: the
// lock that keeps a second llproxy off the file, and how the last save
// went.
type persistence struct {
	lock    *os.File
	lastErr atomic.Pointer[error]
}

// errLocked is a state file another process holds.
var errLocked = errors.New("another process holds it")

// Open makes path the directory's state file for the life of the process:
// it locks it (path + ".lock": a second llproxy on the same file would
// keep only the last writer's use), reads today's use back (Load) and
// writes it once, so that a file that cannot be written is a start-up
// error, not budgets that silently start from zero at the next start.
func (d *Directory) Open(path string, now time.Time) error {
	lf, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("state file %s: cannot create its lock: %w", path, err)
	}
	if err := lockFile(lf); err != nil {
		lf.Close()
		return fmt.Errorf("state file %s: cannot lock it (%w): is another llproxy using it? Give each its own stateFile, "+
			"or share budgets between replicas through shared.redis", path, err)
	}
	if err := d.Load(path, now); err != nil {
		lf.Close()
		return err
	}
	if err := d.Save(path, now); err != nil {
		lf.Close()
		return fmt.Errorf("%w: it must be writable, or budgets would start from zero at the next start", err)
	}
	d.persist.lock = lf
	return nil
}

// StateError is why the last save of the state file failed; nil when it
// succeeded (or there is none).
func (d *Directory) StateError() error {
	if e := d.persist.lastErr.Load(); e != nil {
		return *e
	}
	return nil
}

// SaveEvery is how often changed usage is written.
const SaveEvery = 10 * time.Second

// stateVersion is the state file's format: 2 adds spend in money (a file
// of version 1 has none, and is read).
const stateVersion = 2

type stateFile struct {
	Version int `json:"version"`
	// Day is the UTC day the usage is of (YYYY-MM-DD).
	Day string `json:"day"`
	// Clients maps client -> model -> tokens used that day.
	Clients map[string]map[string]int64 `json:"clients"`
	// Spend maps client -> its spend in micro-dollars that day and that
	// month (of Day).
	Spend map[string]spendState `json:"spend,omitempty"`
}

type spendState struct {
	Day   int64 `json:"dayMicroUsd"`
	Month int64 `json:"monthMicroUsd"`
}

const dayLayout = "2006-01-02"

// Load reads the usage of today at now from path. A missing file is an
// empty state; another day's usage is over and not loaded; clients no
// longer configured are dropped.
func (d *Directory) Load(path string, now time.Time) error {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("state file %s: %w", path, err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("state file %s is corrupt (%v); fix or remove it: budgets would start from zero", path, err)
	}
	day, err := time.Parse(dayLayout, st.Day)
	if (st.Version != stateVersion && st.Version != 1) || err != nil {
		return fmt.Errorf("state file %s is corrupt (version %d, day %q); fix or remove it: budgets would start from zero",
			path, st.Version, st.Day)
	}
	for name, models := range st.Clients {
		for model, used := range models {
			if used < 0 {
				return fmt.Errorf("state file %s is corrupt (clients.%s.%s: %d tokens); fix or remove it", path, name, model, used)
			}
		}
	}
	for name, sp := range st.Spend {
		if sp.Day < 0 || sp.Month < 0 {
			return fmt.Errorf("state file %s is corrupt (spend.%s: negative); fix or remove it", path, name)
		}
	}
	switch {
	case dayOf(day) > dayOf(now):
		return fmt.Errorf("state file %s is dated %s, after today (%s): is the clock right? Fix it, or remove the file",
			path, st.Day, now.UTC().Format(dayLayout))
	case perMonth.index(day) == perMonth.index(now):
		// This month's spend goes on, whatever the day.
		for _, c := range d.clients {
			c.led.mu.Lock()
			c.cashEntry(perMonth, now).used = st.Spend[c.Name].Month
			if dayOf(day) == dayOf(now) {
				c.cashEntry(perDay, now).used = st.Spend[c.Name].Day
			}
			c.led.mu.Unlock()
		}
	}
	if dayOf(day) < dayOf(now) {
		return nil // another day's tokens: over
	}
	for _, c := range d.clients {
		models := st.Clients[c.Name]
		c.led.mu.Lock()
		for model, used := range models {
			c.entry(model, now).used = used
		}
		c.led.mu.Unlock()
	}
	return nil
}

// Save writes the usage of today at now to path, atomically.
func (d *Directory) Save(path string, now time.Time) error {
	d.dirty.Store(false)
	today := dayOf(now)
	st := stateFile{Version: stateVersion, Day: now.UTC().Format(dayLayout), Clients: map[string]map[string]int64{},
		Spend: map[string]spendState{}}
	for _, c := range d.clients {
		c.led.mu.Lock()
		if sp := (spendState{Day: c.cashEntry(perDay, now).used, Month: c.cashEntry(perMonth, now).used}); sp != (spendState{}) {
			st.Spend[c.Name] = sp
		}
		for model, u := range c.led.usage {
			if u.day == today && u.used > 0 {
				if st.Clients[c.Name] == nil {
					st.Clients[c.Name] = map[string]int64{}
				}
				st.Clients[c.Name][model] = u.used
			}
		}
		c.led.mu.Unlock()
	}
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(path, append(data, '\n')); err != nil {
		d.dirty.Store(true) // try again next time
		err = fmt.Errorf("state file %s: %w", path, err)
		d.persist.lastErr.Store(&err)
		return err
	}
	d.persist.lastErr.Store(nil)
	return nil
}

// writeAtomic replaces path with data: written to a temporary file in the
// same directory, synced, renamed over path.
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if dh, err := os.Open(dir); err == nil {
		dh.Sync() // the rename itself, on file systems that need it
		dh.Close()
	}
	return nil
}

// Keep saves the usage to path every SaveEvery while it changes, until ctx
// ends. (The last save is the caller's, once the last request settled.)
func (d *Directory) Keep(ctx context.Context, path string, log *slog.Logger) {
	t := time.NewTicker(SaveEvery)
	defer t.Stop()
	save := func() {
		if err := d.Save(path, time.Now()); err != nil {
			log.Error("saving the clients' usage", "error", err)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if d.dirty.Load() {
				safe.Func(log, "saving the state file", save)()
			}
		}
	}
}
