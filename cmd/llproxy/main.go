// Command llproxy is a scheduling gateway between LLM clients and LLM
// servers. See README.md.
//
//	llproxy [-config file] [-listen addr] [-check] [-version]
//	llproxy check [-config file]
//	llproxy version
//	llproxy mock-server [-listen addr] [-chunks n] [-chunk-delay d] [-latency d] [-rpm n [-rpm-slack n]]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/server"
	"github.com/llproxy/llproxy/provider/mock"
	"github.com/llproxy/llproxy/tokenizer"
)

// version is the release, set at build time (-ldflags "-X main.version=v1.2.3");
// without it, the module's version or VCS revision from the build info.
var version = ""

// Version returns llproxy's version and the Go it was built with.
func Version() (v, goVersion string) {
	v = version
	info, ok := debug.ReadBuildInfo()
	if v == "" && ok {
		v = info.Main.Version
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" && (v == "" || v == "(devel)") {
				v = s.Value
				if len(v) > 12 {
					v = v[:12]
				}
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	return v, runtime.Version()
}

const usage = `llproxy: a scheduling gateway between LLM clients and LLM servers.

Usage:
  llproxy [-config file] [-listen addr]   serve (default config: config.json if present, else config-example.json)
  llproxy check [-config file]            validate the config and exit: 0 if valid, 1 if not (also: -check)
  llproxy version                         print the version and exit (also: -version)
  llproxy mock-server [flags]             serve the mock OpenAI-compatible upstream (-h for its flags)
  llproxy healthcheck [-url url]          exit 0 if a running llproxy answers /healthz (containers' HEALTHCHECK)

Flags:
`

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "mock-server":
			os.Exit(mockServer(os.Args[2:]))
		case "version":
			if len(os.Args) > 2 {
				fmt.Fprintln(os.Stderr, "llproxy version: takes no arguments")
				os.Exit(2)
			}
			os.Exit(run([]string{"-version"}))
		case "check":
			os.Exit(run(append([]string{"-check"}, os.Args[2:]...)))
		case "healthcheck":
			os.Exit(healthcheck(os.Args[2:]))
		}
	}
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	fs := flag.NewFlagSet("llproxy", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	configPath := fs.String("config", "", "config file (default: config.json if present, else config-example.json)")
	listen := fs.String("listen", "", "listen address, overriding the config's \"listen\"")
	check := fs.Bool("check", false, "validate the config and exit: 0 if valid, 1 if not")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *showVersion {
		v, gv := Version()
		fmt.Printf("llproxy %s (%s)\n", v, gv)
		return 0
	}
	path := *configPath
	if path == "" {
		path = "config-example.json"
		if _, err := os.Stat("config.json"); err == nil {
			path = "config.json"
		}
	}
	cfg, err := config.Load(path, os.LookupEnv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "llproxy:", err)
		return 1
	}
	if *check {
		fmt.Printf("llproxy: %s is valid (%d routes)\n", path, len(cfg.Routes))
		return 0
	}
	if *listen != "" {
		cfg.Listen = *listen
	}
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel))
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	tok, err := tokenizer.New(cfg.Tokenizer)
	if err != nil {
		logger.Error("tokenizer", "err", err)
		return 1
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	v, gv := Version()
	if err := metrics.BuildInfo(reg, v, gv); err != nil {
		logger.Error("metrics", "err", err)
		return 1
	}
	// LLPROXY_CLOCK_OFFSET skews this process's clock as the shared limits
	// see it (tests of replicas whose clocks disagree).
	var offset time.Duration
	if v := os.Getenv("LLPROXY_CLOCK_OFFSET"); v != "" {
		if offset, err = time.ParseDuration(v); err != nil {
			logger.Error("LLPROXY_CLOCK_OFFSET", "err", err)
			return 1
		}
	}
	gw, err := server.New(server.Options{Config: cfg, Tokenizer: tok, Registry: reg, Logger: logger, ClockOffset: offset})
	if err != nil {
		logger.Error("server", "err", err)
		return 1
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		logger.Error("listen", "err", err)
		return 1
	}
	// The listener serves whichever gateway is current: SIGHUP builds a
	// new one from the reloaded config, which takes the old one's queues
	// over (see server.Options.Previous).
	var cur atomic.Pointer[server.Server]
	cur.Store(gw)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { cur.Load().ServeHTTP(w, r) }),
		ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	run := runGateway(ctx, gw) // fleet health checks and discovery, state file, heartbeats
	logger.Info("llproxy listening", "addr", ln.Addr().String(), "config", path, "routes", len(cfg.Routes))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	for done := false; !done; {
		select {
		case err := <-errc:
			logger.Error("serve", "err", err)
			return 1
		case <-ctx.Done():
			done = true
		case <-hup:
			next, nextCfg, err := reload(path, cfg, tok, reg, logger, offset, cur.Load())
			if err != nil {
				continue // logged; the current config stays
			}
			run.stop()
			prev := cur.Load()
			cur.Store(next)
			next.Takeover(prev, time.Duration(cfg.ShutdownTimeout))
			run = runGateway(ctx, next)
			cfg = nextCfg
		}
	}
	logger.Info("shutting down", "timeout", time.Duration(cfg.ShutdownTimeout).String())
	if err := server.Shutdown(context.Background(), srv, cur.Load(), time.Duration(cfg.ShutdownTimeout)); err != nil {
		logger.Warn("shutdown", "err", err)
		return 1
	}
	return 0
}

// running is a gateway's background work, stopped on a reload.
type running struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func runGateway(ctx context.Context, gw *server.Server) running {
	ctx, cancel := context.WithCancel(ctx)
	r := running{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		gw.Run(ctx)
	}()
	return r
}

func (r running) stop() {
	r.cancel()
	<-r.done
}

// reload reads the config at path again and builds the gateway that takes
// over from prev. A config that does not validate changes nothing: each of
// its errors is logged. What only a restart changes (the listen address,
// the tokenizer, the log level, shared) is logged as such.
func reload(path string, old *config.Config, tok *tokenizer.Tokenizer, reg *prometheus.Registry, logger *slog.Logger,
	offset time.Duration, prev *server.Server) (next *server.Server, cfg *config.Config, err error) {
	defer func() {
		// A reload never takes the running gateway down.
		if p := recover(); p != nil {
			logger.Error("reload failed; the current config stays", "config", path, "panic", fmt.Sprint(p),
				"stack", string(debug.Stack()))
			next, cfg, err = nil, nil, fmt.Errorf("reload: %v", p)
		}
	}()
	cfg, err = config.Load(path, os.LookupEnv)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			logger.Error("reload: the config is not valid; the current one stays", "config", path, "error", line)
		}
		return nil, nil, err
	}
	if cfg.Listen != old.Listen || cfg.LogLevel != old.LogLevel || !reflect.DeepEqual(cfg.Tokenizer, old.Tokenizer) {
		logger.Warn("reload: listen, logLevel and tokenizer change with a restart only; the rest is applied")
	}
	next, err = server.New(server.Options{Config: cfg, Tokenizer: tok, Registry: reg, Logger: logger, ClockOffset: offset,
		Previous: prev})
	if err != nil {
		logger.Error("reload: the new config could not be applied; the current one stays", "error", err.Error())
		return nil, nil, err
	}
	logger.Info("config reloaded", "config", path, "routes", len(cfg.Routes))
	return next, cfg, nil
}

// mockServer serves the mock provider standalone: an OpenAI-compatible
// upstream for load tests and local experiments.
func mockServer(args []string) int {
	fs := flag.NewFlagSet("llproxy mock-server", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:9000", "listen address")
	chunks := fs.Int("chunks", 16, "words per completion (SSE chunks when streamed)")
	chunkDelay := fs.Duration("chunk-delay", 0, "delay between streamed chunks")
	latency := fs.Duration("latency", 0, "delay before the response headers")
	rpm := fs.Int("rpm", 0, "requests per minute the mock admits, as OpenAI does (x-ratelimit headers, 429s); 0: no limit")
	slack := fs.Int("rpm-slack", 0, "requests its -rpm bucket holds beyond a minute's worth")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg := mock.Config{Chunks: *chunks, ChunkDelay: *chunkDelay, Latency: *latency, RPM: *rpm, RPMSlack: *slack}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, "llproxy mock-server:", err)
		return 2
	}
	tok, err := tokenizer.New(tokenizer.Config{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "llproxy mock-server:", err)
		return 1
	}
	m := mock.New(cfg, server.MockCounter(tok))
	mux := http.NewServeMux()
	mux.Handle("/", m)
	// What its limit answered and refused, for load tests (llbench).
	mux.HandleFunc("GET /mock/limited", func(w http.ResponseWriter, _ *http.Request) {
		answered, refused := m.Limited()
		fmt.Fprintf(w, `{"answered":%d,"refused":%d}`+"\n", answered, refused)
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "llproxy mock-server:", err)
		return 1
	}
	fmt.Printf("llproxy mock-server listening on %s\n", ln.Addr())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "llproxy mock-server:", err)
		return 1
	}
	return 0
}

// parse parses a subcommand's flags: code < 0 means go on; otherwise exit
// with it (0 for -h, 2 for a bad flag or an argument nobody takes).
func parse(fs *flag.FlagSet, args []string) (code int) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "%s: unknown argument %q (-h lists what it takes)\n", fs.Name(), fs.Arg(0))
		return 2
	}
	return -1
}

// healthcheck asks a running llproxy whether it is healthy: for container
// images without curl.
func healthcheck(args []string) int {
	fs := flag.NewFlagSet("llproxy healthcheck", flag.ContinueOnError)
	url := fs.String("url", "http://127.0.0.1:8080/healthz", "the /healthz to ask")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(*url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "llproxy healthcheck:", err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, "llproxy healthcheck:", resp.Status)
		return 1
	}
	return 0
}
