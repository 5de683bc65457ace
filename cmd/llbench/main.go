// Command llbench measures llproxy's overhead. It starts, as separate
// processes, a mock upstream (llproxy mock-server), a bare
// httputil.ReverseProxy that only decodes the JSON body (the baseline) and
// llproxy with generous limits, drives each with the same load, and prints
// one table: requests/s, p50/p99 latency and CPU per request of each proxy,
// and their peak RSS.
//
//	./build.sh && ./llbench [-duration 5s] [-gomaxprocs 1]
package main

import (
	"bytes"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "baseline" {
		os.Exit(baseline(os.Args[2:]))
	}
	os.Exit(bench(os.Args[1:]))
}

// chatTemplate is a ~1 KB chat request; %d makes every message unique when
// the scenario wants no cache hits.
const chatTemplate = `{"model":"gpt-4o","max_tokens":%d,"stream":%t,"messages":[
{"role":"system","content":"You are a careful assistant for the platform team %d. Answer briefly, cite the runbook section when you can, and never invent commands that do not exist."},
{"role":"user","content":"Our gateway %d returns 429 to the batch job while the interactive users see normal latency. Is that expected with per-model queues, and how do I see the queue depth?"},
{"role":"assistant","content":"Yes %d. Each model has its own FIFO queue in front of its rpm and tpm buckets, so a batch job that floods one model waits in that model's queue. Watch llproxy_queue_depth in Prometheus."},
{"role":"user","content":"Good %d. The batch job sends max_tokens 4096 on every request but uses about 300. Does that hurt the others, and what should we set instead so the bucket is not drained?"}]}`

func chat(maxTokens int, stream, unique bool) func(int64) []byte {
	fixed := []byte(fmt.Sprintf(chatTemplate, maxTokens, stream, 0, 0, 0, 0))
	if !unique {
		return func(int64) []byte { return fixed }
	}
	return func(i int64) []byte { return []byte(fmt.Sprintf(chatTemplate, maxTokens, stream, i, i, i, i)) }
}

// messagesTemplate is the same conversation as chatTemplate in
// Anthropic's Messages API: the system prompt apart, max_tokens required.
const messagesTemplate = `{"model":"claude-sonnet-4-5","max_tokens":%d,"stream":%t,
"system":"You are a careful assistant for the platform team 0. Answer briefly, cite the runbook section when you can, and never invent commands that do not exist.",
"messages":[
{"role":"user","content":"Our gateway 0 returns 429 to the batch job while the interactive users see normal latency. Is that expected with per-model queues, and how do I see the queue depth?"},
{"role":"assistant","content":"Yes 0. Each model has its own FIFO queue in front of its rpm and tpm buckets, so a batch job that floods one model waits in that model's queue. Watch llproxy_queue_depth in Prometheus."},
{"role":"user","content":"Good 0. The batch job sends max_tokens 4096 on every request but uses about 300. Does that hurt the others, and what should we set instead so the bucket is not drained?"}]}`

func messages(maxTokens int, stream bool) func(int64) []byte {
	fixed := []byte(fmt.Sprintf(messagesTemplate, maxTokens, stream))
	return func(int64) []byte { return fixed }
}

type target struct {
	name string
	p    *proc
	url  string
	more []*proc // its other processes (replicas), whose CPU counts too
	// body, if set, is what this target is sent instead of the
	// scenario's (the same request in another API).
	body func(int64) []byte
}

// cpu is the CPU time of the target's processes so far.
func (t target) cpu() time.Duration {
	c := t.p.cpu()
	for _, p := range t.more {
		c += p.cpu()
	}
	return c
}

func bench(args []string) int {
	fs := flag.NewFlagSet("llbench", flag.ContinueOnError)
	llproxyBin := fs.String("llproxy", "./llproxy", "llproxy binary (./build.sh builds it)")
	duration := fs.Duration("duration", 5*time.Second, "measured time per run")
	warmup := fs.Duration("warmup", time.Second, "unmeasured load before each run")
	chunks := fs.Int("chunks", 100, "chunks per streamed response")
	chunkDelay := fs.Duration("chunk-delay", 0, "the mock upstream's delay between streamed chunks (0: CPU-bound streams)")
	gomaxprocs := fs.Int("gomaxprocs", 0, "GOMAXPROCS for the proxies (0: Go's default)")
	only := fs.String("only", "", "run only the scenarios whose name contains this")
	mem := fs.Bool("memory", false, "measure the memory of an open stream and of a queued request instead")
	memStreams := fs.Int("memory-streams", 1000, "-memory: open streams held")
	memQueued := fs.Int("memory-queued", 10000, "-memory: requests held waiting in a queue")
	redisURL := fs.String("redis", "", "also run llproxy replicas sharing their limits through this Redis (redis://host:port/db, or \"start\": a redis-server llbench runs), against 1 without")
	outage := fs.Bool("redis-outage", false, "with -redis start: kill Redis a third into each measured replicas run and start it again, empty, a second later")
	limitRPM := fs.Int("limit-rpm", 1200, "the at-limit scenario: the requests per minute the upstream allows and llproxy is configured with")
	limitWait := fs.Duration("limit-wait", 2*time.Second, "the at-limit scenario: llproxy's maxQueueWait (longer predicted waits are refused with Retry-After)")
	limitConc := fs.Int("limit-conc", 48, "the at-limit scenario: concurrent clients")
	limitSlack := fs.Int("limit-slack", 3, "the at-limit scenario: requests the upstream's bucket holds beyond a minute's worth (network jitter)")
	nReplicas := fs.Int("replicas", 2, "how many replicas -redis runs")
	ledgerOn := fs.Bool("ledger", true, "llproxy keeps its usage ledger (SQLite beside its config, the default); false: usage.store off")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var ownRedis *redisProc
	if *redisURL == "start" {
		r, err := startRedis()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer r.kill()
		ownRedis, *redisURL = r, r.url()
	} else if *outage {
		fmt.Fprintln(os.Stderr, "llbench: -redis-outage needs -redis start (llbench kills and restarts its own redis-server)")
		return 2
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var env []string
	if *gomaxprocs > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(*gomaxprocs))
	}
	if *mem {
		if err := memory(*llproxyBin, self, env, *memStreams, *memQueued); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	mockAddr, baseAddr, llAddr := freeAddr(), freeAddr(), freeAddr()
	mock, err := start("mock", mockAddr, "/v1/models", nil, *llproxyBin, "mock-server", "-listen", mockAddr, "-chunks", strconv.Itoa(*chunks), "-chunk-delay", chunkDelay.String())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer mock.stop()
	// Two limited upstreams: the lone llproxy's and the replicas', each
	// with its own bucket.
	const atLimitName = "at the key's limit"
	atLimitRuns := strings.Contains(atLimitName, *only)
	limited := [2]string{freeAddr(), freeAddr()}
	for _, addr := range limited {
		if !atLimitRuns {
			break // (and a binary without mock-server -rpm can be measured)
		}
		p, err := start("limited mock", addr, "/v1/models", nil, *llproxyBin, "mock-server", "-listen", addr,
			"-rpm", strconv.Itoa(*limitRPM), "-rpm-slack", strconv.Itoa(*limitSlack))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer p.stop()
	}
	base, err := start("baseline", baseAddr, "/healthz", env, self, "baseline", "-listen", baseAddr, "-upstream", "http://"+mockAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer base.stop()
	dir, _ := os.MkdirTemp("", "llbench")
	defer os.RemoveAll(dir)
	cfgPath := filepath.Join(dir, "config.json")
	cfg := fmt.Sprintf(`{"listen": %q, `+usageOff(*ledgerOn)+`"routes": {"bench": {"forward": "http://%s",
	  "models": {"*": {"maxQueueSize": 100000, "maxQueueWait": 60, "rpm": 1000000000, "tpm": 2000000000}}},
	  "claude": {"forward": "http://%s", "provider": "anthropic",
	  "models": {"*": {"maxQueueSize": 100000, "maxQueueWait": 60, "rpm": 1000000000, "itpm": 2000000000, "otpm": 2000000000}}}`+
		limitRoute(limited[0], *limitRPM, *limitWait, atLimitRuns)+`}}`,
		llAddr, mockAddr, mockAddr)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ll, err := start("llproxy", llAddr, "/healthz", env, *llproxyBin, "-config", cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ll.stop()
	var replicas *target
	if *redisURL != "" {
		r, err := startReplicas(dir, *llproxyBin, mockAddr, limitRoute(limited[1], *limitRPM, *limitWait, atLimitRuns), *redisURL, env, max(1, *nReplicas), *ledgerOn)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		for _, p := range append([]*proc{r.p}, r.more...) {
			defer p.stop()
		}
		replicas = r
	}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
	direct := target{name: "direct", p: mock, url: "http://" + mockAddr + "/v1/chat/completions"}
	baseT := target{name: "baseline", p: base, url: "http://" + baseAddr + "/v1/chat/completions"}
	llT := target{name: "llproxy", p: ll, url: "http://" + llAddr + "/bench/v1/chat/completions"}
	llA := target{name: "llproxy anthropic", p: ll, url: "http://" + llAddr + "/claude/v1/messages", body: messages(16, false)}
	llAS := target{name: "llproxy anthropic", p: ll, url: "http://" + llAddr + "/claude/v1/messages", body: messages(*chunks, true)}

	// The stream must come through llproxy byte for byte (ids and
	// timestamps aside, which the mock makes fresh per response).
	streamBody := chat(*chunks, true, false)(0)
	a, errA := fetch(client, direct.url, streamBody)
	b, errB := fetch(client, llT.url, streamBody)
	volatile := regexp.MustCompile(`"id":"[^"]*","object":"[^"]*","created":\d+`)
	same := errA == nil && errB == nil && bytes.Equal(volatile.ReplaceAll(a, nil), volatile.ReplaceAll(b, nil))
	fmt.Printf("stream through llproxy identical to direct: %v (%d bytes, %d chunks)\n\n", same, len(b), bytes.Count(b, []byte("\n\n")))

	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tconc\ttarget\treq/s\tp50 ms\tp99 ms\tCPU µs/req\tvs first req/s\tΔp50 ms\terrors\t")
	type scenario struct {
		name    string
		body    func(int64) []byte
		conc    []int
		targets []target // the first is what the others are compared with
	}
	scenarios := []scenario{
		{"chat, repeated prompt", chat(16, false, false), []int{1, 16}, []target{baseT, llT}},
		{"chat, unique prompts", chat(16, false, true), []int{1, 16}, []target{baseT, llT}},
		{fmt.Sprintf("stream, %d chunks %s apart", *chunks, chunkDelay), chat(*chunks, true, false), []int{16}, []target{baseT, llT, direct}},
		{"openai chat vs anthropic messages", chat(16, false, false), []int{1, 16}, []target{llT, llA}},
		{fmt.Sprintf("openai vs anthropic stream, %d chunks", *chunks), chat(*chunks, true, false), []int{16}, []target{llT, llAS}},
	}
	if replicas != nil {
		scenarios = append(scenarios, scenario{"chat, repeated prompt, shared limits", chat(16, false, false),
			[]int{1, 16}, []target{llT, *replicas}})
	}
	for _, sc := range scenarios {
		if !strings.Contains(sc.name, *only) {
			continue
		}
		for _, conc := range sc.conc {
			var ref result
			for i, t := range sc.targets {
				body := sc.body
				if t.body != nil {
					body = t.body
				}
				drive(client, t.url, body, conc, *warmup)
				if *outage && len(t.more) > 0 {
					ownRedis.outage(*duration/3, time.Second)
				}
				cpu0 := t.cpu()
				r := drive(client, t.url, body, conc, *duration)
				r.cpu = t.cpu() - cpu0
				vs, dp50 := "", ""
				if i == 0 {
					ref = r
				} else if ref.requests > 0 {
					vs = fmt.Sprintf("%.2fx", r.rps()/ref.rps())
					dp50 = fmt.Sprintf("%+.3f", ms(r.percentile(.5)-ref.percentile(.5)))
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%.3f\t%.3f\t%.0f\t%s\t%s\t%d\t\n", sc.name, conc, t.name, r.rps(),
					ms(r.percentile(.5)), ms(r.percentile(.99)), float64(r.cpuPerRequest().Microseconds()), vs, dp50, r.errors)
			}
		}
	}
	tw.Flush()
	if atLimitRuns {
		lt := target{name: "llproxy", url: "http://" + llAddr + "/limited/v1/chat/completions"}
		ts := []target{lt}
		if replicas != nil {
			rt := *replicas
			rt.url = strings.ReplaceAll(rt.url, "/bench/", "/limited/")
			ts = append(ts, rt)
		}
		atLimit(client, limited, ts, *limitRPM, *limitConc, *limitWait, *warmup, *duration, ownRedis, *outage)
	}
	fmt.Printf("\npeak RSS: baseline %.1f MiB, llproxy %.1f MiB (mock upstream %.1f MiB)\n", base.peakRSS(), ll.peakRSS(), mock.peakRSS())
	if replicas != nil {
		fmt.Printf("peak RSS of each replica:")
		for _, p := range append([]*proc{replicas.p}, replicas.more...) {
			fmt.Printf(" %.1f MiB", p.peakRSS())
		}
		fmt.Println()
	}
	fmt.Printf("CPU per request is the proxy process's own (for direct: the mock's); GOMAXPROCS=%s; %s per run after %s warm-up\n",
		orDefault(*gomaxprocs), *duration, *warmup)
	return 0
}

// usageOff is the config's usage section when the ledger is off.
func usageOff(ledger bool) string {
	if ledger {
		return ""
	}
	return `"usage": {"store": "off"}, `
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func orDefault(n int) string {
	if n == 0 {
		return "default"
	}
	return strconv.Itoa(n)
}

// startReplicas starts n llproxy processes whose limits are shared
// through Redis at redisURL; the load goes round them.
func startReplicas(dir, bin, mockAddr, limited, redisURL string, env []string, n int, ledger bool) (*target, error) {
	t := &target{name: strconv.Itoa(n) + " replicas + Redis"}
	for i := range n {
		addr := freeAddr()
		sub := filepath.Join(dir, "replica"+strconv.Itoa(i))
		if err := os.MkdirAll(sub, 0o700); err != nil {
			return nil, err
		}
		cfg := fmt.Sprintf(`{"listen": %q, `+usageOff(ledger)+`"shared": {"redis": %q, "prefix": "llbench:"}, "routes": {"bench": {"forward": "http://%s",
		  "models": {"*": {"maxQueueSize": 100000, "maxQueueWait": 60, "rpm": 1000000000, "tpm": 2000000000}}}`+limited+`}}`, addr, redisURL, mockAddr)
		path := filepath.Join(sub, "config.json")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			return nil, err
		}
		p, err := start("replica", addr, "/healthz", env, bin, "-config", path)
		if err != nil {
			return nil, err
		}
		if i == 0 {
			t.p = p
		} else {
			t.more = append(t.more, p)
		}
		t.url += "http://" + addr + "/bench/v1/chat/completions "
	}
	return t, nil
}
