package relay

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A stale pooled connection to a crashed backend is a connection failure,
// known by its errno, never by the error's text.
func TestBrokenPipeIsAConnectionDrop(t *testing.T) {
	for _, err := range []error{
		&net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", syscall.EPIPE)},
		&net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)},
		fmt.Errorf("wrapped: %w", &net.OpError{Op: "write", Err: syscall.ECONNABORTED}),
		io.ErrUnexpectedEOF,
	} {
		assert.True(t, IsConnectionDrop(err), "%v", err)
	}
	assert.False(t, IsConnectionDrop(fmt.Errorf("something about a broken pipe in words only")),
		"classified by the error chain, never its text")
	assert.False(t, IsConnectionDrop(context.DeadlineExceeded), "a timeout may still be running upstream")
}

// The retry policy, without HTTP.
func TestJudge(t *testing.T) {
	dial := &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}
	reset := &net.OpError{Op: "read", Err: syscall.ECONNRESET}
	all := Policy{CanRetry: true, CanWait429: true, Retryable429: true}
	for _, tt := range []struct {
		name   string
		status int
		err    error
		p      Policy
		want   Verdict
	}{
		{"200", 200, nil, all, Deliver},
		{"400 is the client's", 400, nil, all, Deliver},
		{"retryable 429", 429, nil, all, RetryRateLimited},
		{"quota 429", 429, nil, Policy{CanRetry: true, CanWait429: true}, Deliver},
		{"429s used up", 429, nil, Policy{CanRetry: true, Retryable429: true}, Deliver},
		{"503", 503, nil, all, RetryServerError},
		{"503, no retries left", 503, nil, Policy{}, Deliver},
		{"never sent", 0, dial, all, RetryConnect},
		{"dropped", 0, reset, all, RetryConnect},
		{"dropped, no retries left", 0, reset, Policy{}, Failed},
		{"timeout", 0, context.DeadlineExceeded, all, Failed},
		{"client gone", 0, reset, Policy{CanRetry: true, ClientGone: true}, Failed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, Judge(tt.status, tt.err, tt.p))
		})
	}
}

// The outgoing request: the route's prefix off the path, the target's
// base path on, the query kept, hop-by-hop and forwarding headers off.
func TestRequest(t *testing.T) {
	in := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions?x=1", strings.NewReader("{}"))
	in.Header.Set("Connection", "close, X-Secret-Hop")
	in.Header.Set("X-Secret-Hop", "1")
	in.Header.Set("X-Forwarded-For", "10.0.0.1")
	in.Header.Set("Te", "trailers")
	target, _ := url.Parse("https://api.example.com/base")
	out := Request(in, "/openai", target)
	assert.Equal(t, "https://api.example.com/base/v1/chat/completions?x=1", out.URL.String())
	assert.Empty(t, out.Header.Get("Connection"))
	assert.Empty(t, out.Header.Get("X-Secret-Hop"))
	assert.Empty(t, out.Header.Get("X-Forwarded-For"))
	assert.Equal(t, "trailers", out.Header.Get("Te"))
	assert.Nil(t, out.Body, "the caller attaches the body")
	assert.Empty(t, out.Host)
}

// Respond hands the answer on, flushing as it goes.
func TestRespond(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Keep-Alive", "timeout=5")
		io.WriteString(w, "data: a\n\n")
	}))
	defer up.Close()
	res, err := http.Get(up.URL)
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	Respond(rec, httptest.NewRequest(http.MethodGet, "/", nil), res)
	assert.Equal(t, "data: a\n\n", rec.Body.String())
	assert.True(t, rec.Flushed)
	assert.Empty(t, rec.Header().Get("Keep-Alive"), "hop-by-hop")
}
